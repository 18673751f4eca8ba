"""One alignment round as four phases (pairs, train, refresh, eval), and the two ways to schedule them.

``run_round`` runs them one after another (on-policy: round *r* generates with the weights of round
*r − 1* and trains from them). ``run_round_overlapped`` (``loop.overlap: one_round_off_policy``)
generates and scores round *r + 1* on the replicas while round *r* trains, with the weights they hold
(version *r − 1*), and refreshes them to version *r* between two generation calls as soon as it is
written: every pair records the version that generated it, and each round logs how stale its pairs
were relative to the weights it trains from. Each phase records its result in the state and saves it,
so ``--resume`` redoes no finished phase whichever schedule ran.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from anisora_ray.config import AnisoraConfig
from anisora_ray.eval.cache_audit import AUDIT_DIR, audit_cache, audit_due
from anisora_ray.eval.heldout import evaluate
from anisora_ray.gapo.trainer import train_gapo
from anisora_ray.io import fs
from anisora_ray.loop import cache_policy, guard, retention
from anisora_ray.loop.report import register_weights
from anisora_ray.loop.samples import close_orphans, eval_row, log_audit, log_samples
from anisora_ray.loop.state import AlignState, RoundState
from anisora_ray.pairs.stage import run_pairs
from anisora_ray.pairs.writer import pairs_table, read_pairs
from anisora_ray.reward.statistics import RewardStatistics
from anisora_ray.tracking import log_metrics, log_metrics_once, mlflow_run, new_run

log = logging.getLogger(__name__)


@dataclass
class RoundContext:
    """What every phase needs: the job's config, state and worker groups."""

    cfg: AnisoraConfig
    state: AlignState
    workers: object  # loop.align.Workers
    heldout: list
    train_manifest: str
    out: str
    root: str
    progress: bool
    parent_run_id: str
    state_uri: str
    statistics: RewardStatistics | None
    lock: threading.Lock = field(default_factory=threading.Lock)  # the overlapped schedule saves from two threads

    def save(self) -> None:
        with self.lock:
            self.state.save(self.state_uri)

    def run(self, rs: RoundState):
        """The round's MLflow run (created by its first phase, continued by the others)."""
        return mlflow_run(self.cfg, f"round-{rs.index}", parent_run_id=self.parent_run_id,
                          tags={"anisora.stage": "round"}, run_id=rs.mlflow_run_id or None)


def prepare_round(ctx: RoundContext, rs: RoundState) -> None:
    """Before round ``rs`` writes anything (again): the cache's verdict may stop the job here, the disk must hold the
    round (``run.free_space``), and the output folder's size at its start is noted once (its ``written_mb``)."""
    if rs.reached("evaluated"):
        return
    cache_policy.check_go_on(ctx.cfg, ctx.state)  # the audits showed the cache moving the pairs: stop here
    free = retention.check_free_space(ctx.cfg, ctx.state, rs.index)
    retention.round_started(ctx.cfg, rs)
    ctx.save()
    import psutil  # a Ray dependency

    # the driver's memory round by round: what a run of days watches (Ray's driver grows a little per dataset)
    log_metrics({"driver_rss_mb": psutil.Process().memory_info().rss / 2**20,
                 **({"disk_free_gb": free} if free is not None else {})}, step=rs.index)


class PairsStopped(Exception):
    """The overlapped pairs stage stopped because the round beside it failed (its written prompts are kept)."""


def pairs_phase(ctx: RoundContext, rs: RoundState, stop: threading.Event | None = None) -> None:
    """Generate, score and pair the training prompts with the weights the replicas hold now; ``stop``, once set,
    ends the stage after the prompt being written (the overlapped schedule's training or refresh failed)."""
    if rs.reached("paired"):
        return
    cfg, workers = ctx.cfg, ctx.workers
    with ctx.run(rs) as run:
        if rs.mlflow_run_id != run.info.run_id:  # saved at once: a driver killed mid-round continues this run
            rs.mlflow_run_id = run.info.run_id
            ctx.save()
        workers.start(ctx.state.latest_weights())
        exact = cache_policy.rollouts_exact(cfg, ctx.state)  # the audits showed the cache moving the pairs
        log.info("round %d/%d: generate, score and pair (weights version %d%s)", rs.index, cfg.loop.rounds,
                 max(workers.replicas.weights_versions()), ", every step computed" if exact else "")
        began = time.perf_counter()
        result = run_pairs(cfg, ctx.train_manifest, fs.join(ctx.out, f"round-{rs.index}", "pairs"), workers.replicas,
                           round_index=rs.index, progress=ctx.progress, reward_actors=workers.rewards,
                           statistics=ctx.statistics, exact=exact, on_prompt=_stopper(stop) if stop else None)
        seconds = time.perf_counter() - began
        pairs = sorted(read_pairs(result.out_uri), key=lambda p: p.prompt_id)  # sums in a fixed order
        rs.pairs_uri = result.out_uri
        rs.metrics.update({
            "pairs": float(len(pairs)), "candidates_per_second": result.candidates / max(seconds, 1e-9),
            "pairs_seconds": seconds, **({"rollouts_exact": float(exact)} if cfg.generator.cache.kind != "none" else {}),
            "train_winner_reward": sum(p.winner_reward for p in pairs) / max(1, len(pairs)),
            "train_loser_reward": sum(p.loser_reward for p in pairs) / max(1, len(pairs)),
            "train_reward_gap": sum(p.reward_gap for p in pairs) / max(1, len(pairs)),
            **{f"train_pair_{d}": sum(p.winner_scores[d] + p.loser_scores[d] for p in pairs) / (2 * len(pairs))
               for d in (pairs[0].winner_scores if pairs else {})}})
        log_metrics(rs.metrics, step=rs.index)
        log_samples(cfg, rs.pairs_uri, fs.join(ctx.out, f"round-{rs.index}", "samples"))
        rs.phase = "paired"
        ctx.save()


def _stopper(stop: threading.Event):
    def check(prompt_id: str) -> None:
        if stop.is_set():
            raise PairsStopped(f"pairs stopped after {prompt_id}: the round beside them failed")
    return check


def staleness(pairs, trained_from: int) -> dict[str, float]:
    """How many versions behind the weights a round trains from its pairs were generated (0 = on-policy)."""
    counts = Counter(trained_from - p.weights_version for p in pairs)
    total = max(1, sum(counts.values()))
    out = {f"pairs_staleness_{lag}_fraction": n / total for lag, n in sorted(counts.items())}
    out["pairs_staleness_mean"] = sum(lag * n for lag, n in counts.items()) / total
    out["pairs_staleness_max"] = float(max(counts, default=0))
    return out


def train_phase(ctx: RoundContext, rs: RoundState, live: bool) -> None:
    """GAPO from the previous round's weights on this round's pairs; with ``live`` the trainer also streams
    the written weights to the running replicas (``loop.refresh: live``)."""
    if rs.reached("trained"):
        return
    cfg, workers = ctx.cfg, ctx.workers
    previous = ctx.state.latest_weights()
    with ctx.run(rs) as run:
        name = f"gapo-round-{rs.index}"
        rs.metrics.update(staleness(read_pairs(rs.pairs_uri), previous.weights_version if previous else 0))
        if rs.train_run_id:  # a driver died during this training: the same Ray Train run and MLflow run go on
            log.info("round %d/%d: GAPO training resumes from its last checkpoint", rs.index, cfg.loop.rounds)
        else:
            log.info("round %d/%d: GAPO training (%d updates)", rs.index, cfg.loop.rounds, cfg.gapo.steps)
            rs.train_run_id = new_run(cfg, name, parent_run_id=run.info.run_id, tags={"anisora.stage": "gapo"})
            ctx.save()
        if cfg.loop.placement == "shared":
            workers.stop()  # the trainer takes the GPUs
        close_orphans(run.info.run_id, keep=rs.train_run_id)
        replicas = workers.replicas if live else None  # None: no refresh from inside the trainer
        m = train_gapo(cfg, pairs_table(rs.pairs_uri), fs.join(ctx.out, f"round-{rs.index}", "weights"), root=ctx.root,
                       init_uri=previous.weights_uri if previous else None, run_name=name, storage_name=name,
                       mlflow_run_id=rs.train_run_id, parent_run_id=run.info.run_id,
                       replicas=replicas.actors if replicas else None,
                       replicas_version=max(replicas.weights_versions()) if replicas else 0,
                       replica_nodes=[p["node_id"] for p in replicas.placements()] if replicas else None,
                       final_refresh=cfg.loop.refresh == "live",
                       cache_uri=retention.latent_cache_uri(ctx.out, rs.index))
        rs.weights_uri, rs.checkpoint_uri = m["weights_uri"], m["checkpoint_uri"]
        rs.metrics.update({f"train_{k}": float(m[k]) for k in ("loss", "dpo", "gain", "implicit_accuracy", "step_seconds")})
        if m.get("live_weights_version"):  # already on the replicas, streamed from the trainer's memory
            rs.metrics.update(live_version=float(m["live_weights_version"]), refresh_seconds=m["live_refresh_seconds"])
        log_metrics(rs.metrics, step=rs.index)
        rs.phase = "trained"
        ctx.save()


def refresh_phase(ctx: RoundContext, rs: RoundState) -> None:
    """The round's weights on every replica (adopted after a live stream, else from storage) and registered."""
    if rs.reached("refreshed"):
        return
    cfg, workers = ctx.cfg, ctx.workers
    with ctx.run(rs) as run:
        if workers.replicas is None:  # shared placement: start the replicas straight at the new weights
            previous = ctx.state.latest_weights()
            workers.start(None)
            version, reports = workers.replicas.refresh_from(rs.weights_uri, (previous.weights_version if previous else 0) + 1)
        else:  # streamed by the trainer (each replica verified it), else from storage by every replica
            live = rs.metrics.pop("live_version", None)
            version, reports = (workers.replicas.adopt(rs.weights_uri, int(live)) if live else None), []
            if version is None:
                version, reports = workers.replicas.refresh_from(rs.weights_uri)
        rs.weights_version = version.version
        if reports:
            rs.metrics["refresh_seconds"] = max(r["seconds"] for r in reports)
        rs.metrics.update(refresh_mb=version.num_bytes / 1e6, refresh_live=float(not reports))
        registered = register_weights(cfg.loop.registered_model, rs.weights_uri, run.info.run_id, rs.index,
                                      version.version) if cfg.loop.registered_model else None
        if registered is not None:
            rs.metrics["model_version"] = float(registered)
        log.info("round %d/%d: %d replica(s) at weights version %d", rs.index, cfg.loop.rounds,
                 len(workers.replicas.actors), version.version)
        rs.phase = "refreshed"
        ctx.save()


def eval_phase(ctx: RoundContext, rs: RoundState) -> None:
    """Held-out evaluation of the round's weights, and the reward-hacking guard's verdict."""
    import mlflow

    if rs.reached("evaluated"):
        return
    cfg, workers, state = ctx.cfg, ctx.workers, ctx.state
    base = fs.join(ctx.out, f"round-{rs.index}")
    with ctx.run(rs):
        log.info("round %d/%d: held-out evaluation", rs.index, cfg.loop.rounds)
        workers.start(state.latest_weights(), rewards=True)
        result = evaluate(cfg, ctx.heldout, workers.replicas, workers.rewards, fs.join(base, "eval"), ctx.progress,
                          statistics=ctx.statistics)
        audited = audit_metrics(cfg, rs.index, ctx.heldout, workers, fs.join(base, "eval"),
                                ctx.statistics, ctx.progress, state, ctx.parent_run_id)
        workers.release_rewards()
        row = eval_row(rs.index, result, state.baseline["per_prompt"], cfg.eval.bootstrap_samples, cfg.run.seed,
                       state.baseline.get("per_candidate"))
        row.update(audited)
        if cfg.loop.guard.enabled:
            current = guard.measure_round(cfg, fs.join(base, "eval"))
            row.update(guard.means(current))
            verdict = guard.decide(cfg, state.baseline["guard"], current, row, rs.index)
            row["guard_fired"] = float(verdict["fired"])
            if verdict["fired"] and verdict["action"] != "warn":
                state.guard = verdict
                guard.record(ctx.out, verdict, ctx.parent_run_id)
        rs.metrics.update(row)
        log_metrics(rs.metrics, step=rs.index)
        mlflow.log_metrics({k: float(v) for k, v in row.items() if isinstance(v, int | float)}, step=rs.index,
                           run_id=ctx.parent_run_id)
        log.info("round %d/%d: held-out reward %.4f (round 0: %.4f; gain %+.4f, 95%% CI [%+.4f, %+.4f], p=%.3f)",
                 rs.index, cfg.loop.rounds, row["heldout_reward"], state.baseline["row"]["heldout_reward"],
                 row["mean_diff"], row["ci_low"], row["ci_high"], row["p_value"])
        rs.phase = "evaluated"
        ctx.save()


def audit_metrics(cfg, index: int, heldout, workers, eval_dir: str, statistics, progress: bool, state: AlignState,
                  parent_run_id: str) -> dict[str, float]:
    """The cache audit's metrics when the held-out evaluation of round ``index`` (in ``eval_dir``) runs it
    (eval/cache_audit.py), pooled over the job's audits so far (loop/cache_policy.py: the verdict on the cache)."""
    if not audit_due(cfg, index):
        return {}
    audit = audit_cache(cfg, heldout, workers.replicas, workers.rewards, fs.join(eval_dir, AUDIT_DIR), statistics, progress)
    log_audit(audit, cfg.generator.fps)
    return {**audit.metrics(), **cache_policy.record_audit(cfg, state, index, audit.pairs, parent_run_id)}


def timed(ctx: RoundContext, rs: RoundState, name: str, phase, *args) -> None:
    """Run a phase; when it ran (not skipped on resume), record its wall time as ``<name>_wall_seconds``."""
    before, began = rs.phase, time.perf_counter()
    phase(ctx, rs, *args)
    if rs.phase != before:
        key = f"{name}_wall_seconds"
        rs.metrics[key] = time.perf_counter() - began
        ctx.save()
        log_metrics_once(rs.mlflow_run_id, {key: rs.metrics[key]}, step=rs.index)  # the eval's: after its last log


def run_round(ctx: RoundContext, rs: RoundState) -> None:
    """On-policy: pairs with version r − 1, train from it, refresh to version r, evaluate."""
    timed(ctx, rs, "pairs", pairs_phase)
    timed(ctx, rs, "train", train_phase, True)
    timed(ctx, rs, "refresh", refresh_phase)
    timed(ctx, rs, "eval", eval_phase)


def run_round_overlapped(ctx: RoundContext, rs: RoundState, following: RoundState | None) -> None:
    """One round off-policy: round ``following``'s pairs are made while ``rs`` trains; the replicas move to
    ``rs``'s weights between two generation calls (each loads the written folder in one call, so no
    generation ever sees a partial update), then ``rs`` is evaluated once ``following``'s pairs are done."""
    timed(ctx, rs, "pairs", pairs_phase)  # round 1, or a round a resumed job had not paired yet
    background: dict[str, BaseException] = {}
    stop = threading.Event()  # set when this round's training or refresh fails: the pairs stop at the next prompt

    def make_pairs() -> None:
        try:
            timed(ctx, following, "pairs", pairs_phase, stop)  # its wall time overlaps this round's training
        except BaseException as exc:  # noqa: BLE001 - raised in the controller's thread below
            background["error"] = exc

    worker = None
    if following is not None and not following.reached("paired") and not ctx.state.guard:
        prepare_round(ctx, following)  # its pairs start now, before its own turn in the loop
        worker = threading.Thread(target=make_pairs, name=f"pairs-round-{following.index}", daemon=True)
        worker.start()
    try:
        timed(ctx, rs, "train", train_phase, False)
        timed(ctx, rs, "refresh", refresh_phase)
    finally:
        if worker is not None:
            if sys.exc_info()[1] is not None:  # this round failed: its error is not held back by hours of generation
                log.info("round %d failed: stopping round %d's pairs after the prompt in hand (kept for --resume)",
                         rs.index, following.index)
                stop.set()
            worker.join()
            if "error" in background and sys.exc_info()[1] is not None \
                    and not isinstance(background["error"], PairsStopped):  # both failed: the pairs' error is said too
                log.error("round %d's pairs failed as well, beside this round's training or refresh: %s: %s",
                          following.index, type(background["error"]).__name__, background["error"])
    if "error" in background:
        raise background["error"]
    timed(ctx, rs, "eval", eval_phase)
