"""``anisora-ray align``: R rounds of generate → score → pair → GAPO train → refresh → held-out eval.

One controller drives persistent worker groups: the generator replicas and the six reward actors
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
from anisora_ray.errors import ConfigError
from anisora_ray.eval.heldout import EvalResult, evaluate, heldout_items
from anisora_ray.eval.stats import paired_comparison
from anisora_ray.gapo.trainer import train_gapo
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.generation.stage import resolve_prompts
from anisora_ray.io import fs
from anisora_ray.loop import guard
from anisora_ray.loop.html_report import build_report, rows_of
from anisora_ray.loop.placement import check_cluster_fits
from anisora_ray.loop.report import contact_sheet, plot_reward_curve, register_weights, side_by_side
from anisora_ray.loop.state import AlignState, RoundState
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.pairs.stage import run_pairs
from anisora_ray.pairs.writer import pairs_table, read_pairs
from anisora_ray.reward.actors import RewardActors
from anisora_ray.reward.base import check_reward_options
from anisora_ray.reward.statistics import FILENAME as STATISTICS_FILE
from anisora_ray.reward.statistics import RewardStatistics, frozen_statistics
from anisora_ray.runtime import init_ray
from anisora_ray.tracking import log_metrics, log_startup, mlflow_run, new_run

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


def _eval_row(index: int, result: EvalResult, baseline: dict[str, float] | None, samples: int, seed: int) -> dict:
    row = {"round": index, **result.metrics(), "weights_version": result.weights_version}
    if baseline is not None:
        row.update(paired_comparison(baseline, result.per_prompt, samples=samples, seed=seed).to_dict())
    return row


def _log_samples(cfg: AnisoraConfig, pairs_uri: str, out: str) -> None:
    """The round's pair tables and side-by-side winner | loser videos, as artifacts of the round's run."""
    import mlflow

    if not fs.is_url(pairs_uri):
        for name in sorted(os.listdir(pairs_uri)):
            if name.endswith(".parquet"):
                mlflow.log_artifact(os.path.join(pairs_uri, name), artifact_path="pairs")
    for pair in read_pairs(pairs_uri)[: cfg.eval.sample_videos]:
        uri = side_by_side(pair, fs.join(out, f"{pair.prompt_id}-winner-vs-loser.mp4"), cfg.generator.fps)
        if not fs.is_url(uri):
            mlflow.log_artifact(uri, artifact_path="pairs")


def _close_orphans(parent_run_id: str, keep: str) -> None:
    """Mark runs a killed driver left RUNNING under ``parent_run_id`` as KILLED, except ``keep`` (the
    training run a resumed round continues)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    for orphan in client.search_runs([parent.info.experiment_id],
                                     f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        if orphan.info.run_id != keep:
            client.set_terminated(orphan.info.run_id, status="KILLED")


def run_alignment(cfg: AnisoraConfig, resume: bool = False, progress: bool = True, root: str | None = None) -> AlignResult:
    """Run (or with ``resume`` continue) the alignment job; returns the per-round held-out table."""
    import mlflow

    root = root or os.getcwd()
    out = fs.join(fs.normalize(cfg.run.output_dir), "align")
    state_uri = fs.join(out, "state.json")
    if fs.exists(state_uri) and not resume:
        raise ConfigError(f"{state_uri} exists: pass --resume to continue that job, or set run.output_dir elsewhere")
    state = AlignState.load(state_uri) if resume and fs.exists(state_uri) else AlignState()
    fs.check_writable(out)  # output, manifests and reward options fail here, before Ray, models or GPUs
    train_manifest = resolve_prompts(cfg)
    heldout = heldout_items(cfg, train_manifest)
    check_reward_options(cfg.reward)
    init_ray(cfg.ray)
    check_cluster_fits(cfg)  # a clear error within ray.wait_for_resources_s, not a silent wait
    workers = Workers(cfg)
    rounds = cfg.loop.rounds
    with mlflow_run(cfg, cfg.run.name, tags={"anisora.stage": "align"}, run_id=state.parent_run_id or None) as parent:
        state.parent_run_id = parent.info.run_id
        state.save(state_uri)
        try:
            workers.start(state.latest_weights())
            # the configured file, else those frozen at round 0 (None before round 0 has run, or with no z-scoring)
            statistics = frozen_statistics(cfg.reward, state.statistics_uri)
            fresh_baseline = not state.baseline or (cfg.loop.guard.enabled and "guard" not in state.baseline)
            if not state.baseline:
                log.info("round 0/%d: held-out evaluation of the untrained generator", rounds)
                workers.start(None, rewards=True)
                base = evaluate(cfg, heldout, workers.replicas, workers.rewards, fs.join(out, "round-0", "eval"), progress,
                                statistics=statistics)
                workers.release_rewards()
                if base.statistics is not None and statistics is None:  # frozen here for every later round
                    statistics = base.statistics
                    state.statistics_uri = statistics.save(fs.join(out, STATISTICS_FILE))
                    log.info("z-score statistics frozen from the round-0 held-out candidates: %s", state.statistics_uri)
                state.baseline = {"per_prompt": base.per_prompt, "row": _eval_row(0, base, None, 0, 0)}
                state.save(state_uri)
            if cfg.loop.guard.enabled and "guard" not in state.baseline:  # the guard measures of round 0
                state.baseline["guard"] = guard.measure_round(cfg, fs.join(out, "round-0", "eval"))
                state.baseline["row"].update(guard.means(state.baseline["guard"]))
                state.save(state_uri)
            if fresh_baseline:
                log_metrics(state.baseline["row"], step=0)
            for index in range(1, rounds + 1):
                if state.guard:  # the guard stopped the loop (a resumed job does not go past it)
                    break
                _run_round(cfg, state, state.round(index), workers, heldout, train_manifest, out, root, progress,
                           parent.info.run_id, state_uri, statistics)
                if state.guard.get("action") == "rollback" and "best_round" not in state.guard:
                    _roll_back(cfg, state, workers, out, state_uri, parent.info.run_id)
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


def _roll_back(cfg: AnisoraConfig, state: AlignState, workers: Workers, out: str, state_uri: str, parent_run_id: str) -> None:
    """The replicas back to the best round the guard passed; its registered version gets the ``best`` alias."""
    rows = rows_of(state)
    flagged = {int(r["round"]) for r in rows if r.get("guard_fired")}
    best = guard.best_round(rows, flagged)
    state.guard["best_round"] = best
    target = state.latest_weights()
    if target is None:  # round 0: a fresh replica group on the untrained weights
        workers.stop()
        workers.start(None)
    else:
        workers.replicas.refresh_from(target.weights_uri)
    if cfg.loop.registered_model:
        version = (str(int(target.metrics["model_version"])) if target is not None else
                   register_weights(cfg.loop.registered_model, resolve_pretrained(cfg.model, cfg.generator),
                                    parent_run_id, 0, 0))
        guard.set_best_alias(cfg.loop.registered_model, version)
        state.guard["best_model_version"] = version
    log.warning("guard: replicas rolled back to round %d's weights", best)
    guard.record(out, state.guard)
    state.save(state_uri)


def _run_round(cfg: AnisoraConfig, state: AlignState, rs: RoundState, workers: Workers, heldout, train_manifest: str,
               out: str, root: str, progress: bool, parent_run_id: str, state_uri: str,
               statistics: RewardStatistics | None) -> None:
    import mlflow

    rounds = cfg.loop.rounds
    base = fs.join(out, f"round-{rs.index}")
    with mlflow_run(cfg, f"round-{rs.index}", parent_run_id=parent_run_id, tags={"anisora.stage": "round"},
                    run_id=rs.mlflow_run_id or None) as run:
        rs.mlflow_run_id = run.info.run_id
        if not rs.reached("paired"):
            workers.start(state.latest_weights())
            log.info("round %d/%d: generate, score and pair (weights version %d)", rs.index, rounds,
                     max(workers.replicas.weights_versions()))
            began = time.perf_counter()
            result = run_pairs(cfg, train_manifest, fs.join(base, "pairs"), workers.replicas, round_index=rs.index,
                               progress=progress, reward_actors=workers.rewards, statistics=statistics)
            seconds = time.perf_counter() - began
            pairs = sorted(read_pairs(result.out_uri), key=lambda p: p.prompt_id)  # sums in a fixed order
            rs.pairs_uri = result.out_uri
            rs.metrics.update({
                "pairs": float(len(pairs)), "candidates_per_second": result.candidates / max(seconds, 1e-9),
                "train_winner_reward": sum(p.winner_reward for p in pairs) / max(1, len(pairs)),
                "train_loser_reward": sum(p.loser_reward for p in pairs) / max(1, len(pairs)),
                "train_reward_gap": sum(p.reward_gap for p in pairs) / max(1, len(pairs)),
                **{f"train_pair_{d}": sum(p.winner_scores[d] + p.loser_scores[d] for p in pairs) / (2 * len(pairs))
                   for d in (pairs[0].winner_scores if pairs else {})}})
            log_metrics(rs.metrics, step=rs.index)
            _log_samples(cfg, rs.pairs_uri, fs.join(base, "samples"))
            rs.phase = "paired"
            state.save(state_uri)
        if not rs.reached("trained"):
            name = f"gapo-round-{rs.index}"
            if rs.train_run_id:  # a driver died during this training: the same Ray Train run and MLflow run go on
                log.info("round %d/%d: GAPO training resumes from its last checkpoint", rs.index, rounds)
            else:
                log.info("round %d/%d: GAPO training (%d updates)", rs.index, rounds, cfg.gapo.steps)
                rs.train_run_id = new_run(cfg, name, parent_run_id=run.info.run_id, tags={"anisora.stage": "gapo"})
                state.save(state_uri)
            if cfg.loop.placement == "shared":
                workers.stop()  # the trainer takes the GPUs
            previous = state.latest_weights()
            _close_orphans(run.info.run_id, keep=rs.train_run_id)
            live = workers.replicas  # None in shared placement: no mid-training refresh then
            m = train_gapo(cfg, pairs_table(rs.pairs_uri), fs.join(base, "weights"), root=root,
                           init_uri=previous.weights_uri if previous else None, run_name=name, storage_name=name,
                           mlflow_run_id=rs.train_run_id, parent_run_id=run.info.run_id,
                           replicas=live.actors if live else None,
                           replicas_version=max(live.weights_versions()) if live else 0,
                           replica_nodes=[p["node_id"] for p in live.placements()] if live else None,
                           final_refresh=cfg.loop.refresh == "live")
            rs.weights_uri, rs.checkpoint_uri = m["weights_uri"], m["checkpoint_uri"]
            if m.get("live_weights_version"):  # already on the replicas, streamed from the trainer's memory
                rs.metrics.update(live_version=float(m["live_weights_version"]), refresh_seconds=m["live_refresh_seconds"])
            rs.metrics.update({f"train_{k}": float(m[k]) for k in ("loss", "dpo", "gain", "implicit_accuracy", "step_seconds")})
            log_metrics(rs.metrics, step=rs.index)
            rs.phase = "trained"
            state.save(state_uri)
        if not rs.reached("refreshed"):
            if workers.replicas is None:  # shared placement: start the replicas straight at the new weights
                previous = state.latest_weights()
                workers.start(None)
                version, reports = workers.replicas.refresh_from(rs.weights_uri,
                                                                 (previous.weights_version if previous else 0) + 1)
            else:  # streamed by the trainer (each replica verified it), else from storage by every replica
                live = rs.metrics.pop("live_version", None)
                version, reports = (workers.replicas.adopt(rs.weights_uri, int(live)) if live else None), []
                if version is None:
                    version, reports = workers.replicas.refresh_from(rs.weights_uri)
            rs.weights_version = version.version
            if reports:
                rs.metrics["refresh_seconds"] = max(r["seconds"] for r in reports)
            rs.metrics.update(refresh_mb=version.num_bytes / 1e6, refresh_live=float(not reports))
            if cfg.loop.registered_model:
                rs.metrics["model_version"] = float(register_weights(cfg.loop.registered_model, rs.weights_uri,
                                                                     run.info.run_id, rs.index, version.version))
            log.info("round %d/%d: %d replica(s) at weights version %d", rs.index, rounds, len(reports), version.version)
            rs.phase = "refreshed"
            state.save(state_uri)
        if not rs.reached("evaluated"):
            log.info("round %d/%d: held-out evaluation", rs.index, rounds)
            workers.start(state.latest_weights(), rewards=True)
            result = evaluate(cfg, heldout, workers.replicas, workers.rewards, fs.join(base, "eval"), progress,
                              statistics=statistics)
            workers.release_rewards()
            row = _eval_row(rs.index, result, state.baseline["per_prompt"], cfg.eval.bootstrap_samples, cfg.run.seed)
            if cfg.loop.guard.enabled:
                current = guard.measure_round(cfg, fs.join(base, "eval"))
                row.update(guard.means(current))
                verdict = guard.decide(cfg, state.baseline["guard"], current, row, rs.index)
                row["guard_fired"] = float(verdict["fired"])
                if verdict["fired"] and cfg.loop.guard.action != "warn":
                    state.guard = verdict
                    guard.record(out, verdict)
            rs.metrics.update(row)
            log_metrics(rs.metrics, step=rs.index)
            mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, int | float)}, step=rs.index,
                               run_id=parent_run_id)
            log.info("round %d/%d: held-out reward %.4f (round 0: %.4f; gain %+.4f, 95%% CI [%+.4f, %+.4f], p=%.3f)",
                     rs.index, rounds, row["heldout_reward"], state.baseline["row"]["heldout_reward"], row["mean_diff"],
                     row["ci_low"], row["ci_high"], row["p_value"])
            rs.phase = "evaluated"
            state.save(state_uri)
