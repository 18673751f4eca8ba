"""``anisora-ray align``: R rounds of generate → score → pair → GAPO train → refresh → held-out eval.

The phases of a round and the two schedules (on-policy, or ``loop.overlap: one_round_off_policy``) are in
:mod:`anisora_ray.loop.rounds`. One controller drives persistent worker groups: the generator replicas and the six reward actors
live for the whole job (``loop.placement: separate``), or are stopped while the trainer holds the
GPUs and started again afterwards (``shared``). Round *r* generates with the weights of round
*r − 1* (on-policy) and trains from them. After every phase the state (phase, pairs, weights,
checkpoint, weights version, metrics, MLflow run ids) is written to
``<run.output_dir>/align/state.json``; ``resume=True`` continues from the last finished phase,
and an interrupted pairs phase resumes prompt by prompt.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from anisora_ray.config import AnisoraConfig
from anisora_ray.data.manifest import require_prompts
from anisora_ray.errors import ConfigError, check_all
from anisora_ray.eval.heldout import evaluate, heldout_items
from anisora_ray.eval.vbench import check_metrics_config
from anisora_ray.gapo.engine import deepspeed_config
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.generation.stage import resolve_prompts
from anisora_ray.io import fs
from anisora_ray.loop import guard, retention
from anisora_ray.loop.html_report import build_report, rows_of
from anisora_ray.loop.placement import check_cluster_fits
from anisora_ray.loop.report import contact_sheet, plot_reward_curve, register_weights
from anisora_ray.loop.rounds import RoundContext, audit_metrics, prepare_round, run_round, run_round_overlapped
from anisora_ray.loop.samples import eval_row
from anisora_ray.loop.state import AlignState, RoundState
from anisora_ray.models.pipeline import check_pretrained, resolve_pretrained
from anisora_ray.pairs.stage import check_pairable
from anisora_ray.reward.actors import RewardActors
from anisora_ray.reward.base import check_reward_options
from anisora_ray.reward.statistics import FILENAME as STATISTICS_FILE
from anisora_ray.reward.statistics import frozen_statistics
from anisora_ray.runtime import init_ray
from anisora_ray.storage_check import check_storage
from anisora_ray.tracking import log_metrics, log_metrics_once, log_startup, mlflow_run, tracking_uri

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignResult:
    state_uri: str
    curve_uri: str  # the reward curve; report.html (`anisora-ray report`) sits beside it
    rows: list[dict]  # one per round (0 = untrained): held-out metrics and the gain's bootstrap
    parent_run_id: str
    guard: dict | None = None  # the guard's verdict when it stopped the loop


class Workers:
    """The generator replicas and reward actors the controller drives (stopped and restarted in shared placement)."""

    def __init__(self, cfg: AnisoraConfig):
        self.cfg = cfg
        self.replicas: GeneratorReplicas | None = None
        self.rewards: RewardActors | None = None

    def start(self, weights: RoundState | None, rewards: bool = False) -> None:
        """Start what is not running; reward actors when asked, or always with ``pairs.reward_stage: actors``
        (with ``pipeline`` the pairs phase brings its own reward pools: holding both would double the ask)."""
        if self.replicas is None:
            self.replicas = GeneratorReplicas(self.cfg, resolve_pretrained(self.cfg.model, self.cfg.generator))
            log_startup(self.replicas.startup_metrics())
            if weights is not None:  # a restarted group must generate with the latest weights, never the base
                self.replicas.refresh_from(weights.weights_uri, weights.weights_version)
        if self.rewards is None and (rewards or self.persistent_rewards):
            self.rewards = RewardActors(self.cfg.reward)

    @property
    def persistent_rewards(self) -> bool:
        return self.cfg.pairs.reward_stage == "actors"

    def release_rewards(self) -> None:
        if self.rewards is not None and not self.persistent_rewards:
            self.rewards.shutdown()
            self.rewards = None

    def stop(self) -> None:
        if self.replicas is not None:
            self.replicas.shutdown()
        if self.rewards is not None:
            self.rewards.shutdown()
        self.replicas = self.rewards = None


def check_inputs(cfg: AnisoraConfig) -> None:
    """What a real config leaves to the user, all said in one error before anything starts (no folder written): the
    manifests, a converted checkpoint folder, the files the reward and the guard read."""
    check_all(lambda: require_prompts(cfg.data.prompts, cfg.eval.prompts), lambda: check_pretrained(cfg.model),
              lambda: _check_manifests_exist(cfg), lambda: check_reward_options(cfg.reward),
              lambda: _check_live_refresh(cfg),
              lambda: check_metrics_config(cfg.eval.metrics) if cfg.loop.guard.enabled or cfg.eval.metrics.enabled
              else None)


def _check_manifests_exist(cfg: AnisoraConfig) -> None:
    missing = [f"{key} = {uri!r}" for key, uri in (("data.prompts", cfg.data.prompts), ("eval.prompts", cfg.eval.prompts))
               if uri not in (None, "demo") and not fs.exists(uri)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} do(es) not exist: build the manifests with `anisora-ray "
                          "build-manifest` (docs/data.md)")


def _check_live_refresh(cfg: AnisoraConfig) -> None:
    if cfg.gapo.refresh_every > 0 and cfg.loop.placement == "shared":  # it would do nothing without a word
        raise ConfigError("gapo.refresh_every streams to live replicas during training; loop.placement = shared stops "
                          "them while the trainer runs: set loop.placement: separate, or gapo.refresh_every: 0")


def run_alignment(cfg: AnisoraConfig, resume: bool = False, progress: bool = True, root: str | None = None) -> AlignResult:
    """Run (or with ``resume`` continue) the alignment job; returns the per-round held-out table."""
    import mlflow

    root = root or os.getcwd()
    check_inputs(cfg)
    out = fs.join(fs.normalize(cfg.run.output_dir), "align")
    state_uri = fs.join(out, "state.json")
    if fs.exists(state_uri) and not resume:
        raise ConfigError(f"{state_uri} exists: pass --resume to continue that job, or set run.output_dir elsewhere")
    state = AlignState.load(state_uri) if resume and fs.exists(state_uri) else AlignState()
    fs.check_writable(out)  # output, manifests and reward options fail here, before Ray, models or GPUs
    train_manifest = resolve_prompts(cfg)
    heldout = heldout_items(cfg, train_manifest)
    check_pairable(cfg)
    deepspeed_config(cfg, root)  # an unreadable JSON or compile with ZeRO-3: now, not after round 1's rollouts
    tracking_uri(cfg)  # a remote output folder needs a tracking server
    first = _next_round(state, cfg.loop.rounds)
    if first is not None:  # before Ray, models or GPUs (a finished job only reports: nothing to check)
        retention.check_free_space(cfg, state, first)
    init_ray(cfg.ray)
    check_cluster_fits(cfg)  # a clear error within ray.wait_for_resources_s, not a silent wait
    check_storage(out, progress=progress)  # every node reads and writes the same folder
    workers = Workers(cfg)
    rounds = cfg.loop.rounds
    with mlflow_run(cfg, cfg.run.name, tags={"anisora.stage": "align"}, run_id=state.parent_run_id or None) as parent:
        state.parent_run_id = parent.info.run_id
        state.save(state_uri)
        try:
            workers.start(state.latest_weights())
            # the configured file, else those frozen at round 0 (None before round 0 has run, or with no z-scoring)
            statistics = frozen_statistics(cfg.reward, state.statistics_uri)
            if not state.baseline:
                log.info("round 0/%d: held-out evaluation of the untrained generator", rounds)
                began = time.perf_counter()
                workers.start(None, rewards=True)
                base = evaluate(cfg, heldout, workers.replicas, workers.rewards, fs.join(out, "round-0", "eval"), progress,
                                statistics=statistics)
                audited = audit_metrics(cfg, 0, heldout, workers, fs.join(out, "round-0", "eval"),
                                        statistics or base.statistics, progress, state, parent.info.run_id)
                workers.release_rewards()
                if base.statistics is not None and statistics is None:  # frozen here for every later round
                    statistics = base.statistics
                    state.statistics_uri = statistics.save(fs.join(out, STATISTICS_FILE))
                    log.info("z-score statistics frozen from the round-0 held-out candidates: %s", state.statistics_uri)
                state.baseline = {"per_prompt": base.per_prompt, "per_candidate": base.per_candidate,
                                  "row": {**eval_row(0, base, None, 0, 0), **audited,
                                          "eval_wall_seconds": time.perf_counter() - began}}
                state.save(state_uri)
            if cfg.loop.guard.enabled and "guard" not in state.baseline:  # the guard measures of round 0
                state.baseline["guard"] = guard.measure_round(cfg, fs.join(out, "round-0", "eval"))
                state.baseline["row"].update(guard.means(state.baseline["guard"]))
                state.save(state_uri)
            log_metrics_once(parent.info.run_id, state.baseline["row"], step=0)  # a driver lost before it: now
            if _rollback_due(state):  # a rollback a crash cut short: finished before anything else
                _roll_back(cfg, state, workers, out, state_uri, parent.info.run_id)
            for index in range(1, rounds + 1):
                if state.guard:  # the guard stopped the loop (a resumed job does not go past it) ...
                    if retention.unrecorded_round(state):  # ... after its round's pruning, which a lost driver missed
                        _apply_retention(cfg, state, out, state_uri, index)
                    break
                rs = state.round(index)
                ctx = RoundContext(cfg, state, workers, heldout, train_manifest, out, root, progress, parent.info.run_id,
                                   state_uri, statistics)
                prepare_round(ctx, rs)
                if cfg.loop.overlap == "one_round_off_policy":
                    run_round_overlapped(ctx, state.round(index), state.round(index + 1) if index < rounds else None)
                else:
                    run_round(ctx, state.round(index))
                if _rollback_due(state):
                    _roll_back(cfg, state, workers, out, state_uri, parent.info.run_id)
                _apply_retention(cfg, state, out, state_uri, index)
            rows = [state.baseline["row"], *(r.metrics for r in sorted(state.rounds, key=lambda r: r.index)
                                             if r.index <= rounds and r.reached("evaluated"))]
            curve = plot_reward_curve(rows, fs.join(out, "reward_curve.png"), f"{cfg.run.name}: held-out reward")
            sheet = contact_sheet(out, rows[-1]["round"], fs.join(out, "heldout_frames.png")) if len(rows) > 1 else None
            for artifact in (curve, sheet):
                if artifact and not fs.is_url(artifact):
                    mlflow.log_artifact(artifact)
            report = build_report(out, fs.join(out, "report.html"), tracking_uri=mlflow.get_tracking_uri(),
                                  title=f"{cfg.run.name}: alignment report")
            if not fs.is_url(report):
                mlflow.log_artifact(report)
            final = rows[-1]
            log_metrics({f"final_{k}": v for k, v in final.items() if k in ("mean_diff", "p_value", "ci_low", "ci_high")})
        finally:
            workers.stop()
    return AlignResult(state_uri, curve, rows, state.parent_run_id, state.guard or None)


def _apply_retention(cfg: AnisoraConfig, state: AlignState, out: str, state_uri: str, index: int) -> None:
    """``run.keep`` on the finished rounds; what the round wrote (``run.free_space`` sizes the next round by it), the
    output folder's size and what was freed go to MLflow per round. What is freed belongs to the round whose end it
    follows: an evaluated round whose sizes are not on record yet (a driver lost before its pruning: its resume
    prunes while it passes round 1), else round ``index``."""
    freed = retention.prune(cfg, state, out)
    rs = retention.unrecorded_round(state) or state.round(index)
    keys = retention.record_sizes(cfg, rs, freed)
    if keys:
        log_metrics({k: rs.metrics[k] for k in keys}, step=rs.index)
    state.save(state_uri)


def _next_round(state: AlignState, rounds: int) -> int | None:
    """The round a (resumed) job runs first: 0 (the untrained generator's evaluation), the first not evaluated,
    or None when there is none (every round evaluated, or the guard stopped the loop)."""
    if not state.baseline:
        return 0
    if state.guard:
        return None
    done = {r.index for r in state.rounds if r.reached("evaluated")}
    return next((i for i in range(1, rounds + 1) if i not in done), None)


def _rollback_due(state: AlignState) -> bool:
    """The guard's verdict says roll back and the rollback has not finished (``best_round`` is saved with its end)."""
    return state.guard.get("action") == "rollback" and "best_round" not in state.guard


def _roll_back(cfg: AnisoraConfig, state: AlignState, workers: Workers, out: str, state_uri: str, parent_run_id: str) -> None:
    """The replicas back to the best round the guard passed; its registered version gets the ``best`` alias."""
    rows = rows_of(state)
    flagged = {int(r["round"]) for r in rows if r.get("guard_fired")}
    best = guard.best_round(rows, flagged)
    target = next((r for r in state.rounds if r.index == best), None)  # latest_weights() once best_round is saved
    if target is None:  # round 0: a fresh replica group on the untrained weights
        workers.stop()
        workers.start(None)
    else:
        workers.replicas.refresh_from(target.weights_uri)
    if cfg.loop.registered_model:
        if target is None:  # round 0: the untrained weights get a version of their own
            version = register_weights(cfg.loop.registered_model, resolve_pretrained(cfg.model, cfg.generator),
                                       parent_run_id, 0, 0)
        else:  # the round's, if the registry took it
            version = str(int(target.metrics["model_version"])) if "model_version" in target.metrics else None
        if version is not None:  # None: the registry refused it (said when it did)
            guard.set_best_alias(cfg.loop.registered_model, version)
            state.guard["best_model_version"] = version
    state.guard["best_round"] = best  # the rollback is done: a crash before this line redoes it on resume
    log.warning("guard: replicas rolled back to round %d's weights", best)
    guard.record(out, state.guard, parent_run_id)
    state.save(state_uri)
