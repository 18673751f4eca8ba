"""``run.keep``: what each finished round of ``align`` keeps on disk, so a run of many rounds stays bounded.

After every evaluated round the controller prunes, per category, the files of finished rounds outside the
last N (``run.keep.<category>``), never what a resume, the report or a guard rollback needs: the round in
progress, the weights the replicas hold, the best round the guard passed (its rollback target), round 0's
and the last round's held-out videos. Every deletion is recorded in the round's state (what, when, the
setting, bytes freed); the tables (pairs, scores, metrics) always stay. Asking for something pruned
(training on pruned pairs, regenerating from pruned weights) fails naming the setting that pruned it.

Before each round, ``run.free_space`` checks that the output folder's disk can hold it (sized by what earlier
rounds of the job wrote) and stops the job, resumable, when it cannot.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import DiskSpaceError
from anisora_ray.eval.cache_audit import AUDIT_DIR, AUDIT_KINDS, AUDIT_SIDE_BY_SIDE
from anisora_ray.io import fs
from anisora_ray.loop.state import AlignState, RoundState
from anisora_ray.pairs.writer import mark_videos_pruned

log = logging.getLogger(__name__)

CATEGORIES = ("candidate_videos", "checkpoints", "weights", "eval_videos")


def latent_cache_uri(out: str, index: int) -> str:
    """Round ``index``'s own latent cache (its training reads it; pruned with the round's videos)."""
    return fs.join(out, f"round-{index}", "latent-cache")


def round_files(cfg: AnisoraConfig, out: str, rs: RoundState, category: str) -> list[str]:
    """The folders of ``category`` that round ``rs`` wrote (``out``: the job's ``align`` folder)."""
    base = fs.join(out, f"round-{rs.index}")
    if category == "candidate_videos":
        return [fs.join(rs.pairs_uri or fs.join(base, "pairs"), "videos"), latent_cache_uri(out, rs.index)]
    if category == "checkpoints":  # the round's whole Ray Train run (gapo/trainer.py: storage_name)
        return [fs.join(fs.normalize(cfg.run.output_dir), "ray-train", f"gapo-round-{rs.index}")]
    if category == "weights":
        return [rs.weights_uri] if rs.weights_uri else []
    if category == "eval_videos":  # with the cache audit's two renderings of its prompts (eval/cache_audit.py)
        audit = fs.join(base, "eval", AUDIT_DIR)
        return [fs.join(base, "eval", "videos"), *(fs.join(audit, kind, "videos") for kind in AUDIT_KINDS),
                fs.join(audit, AUDIT_SIDE_BY_SIDE)]
    raise ValueError(f"unknown retention category {category!r}; expected one of {CATEGORIES}")


def protected(state: AlignState, category: str) -> set[int]:
    """Rounds whose ``category`` files stay whatever ``run.keep`` says."""
    from anisora_ray.loop import guard
    from anisora_ray.loop.html_report import rows_of

    finished = [r for r in state.rounds if r.reached("evaluated")]
    if category == "weights":
        keep = {latest.index} if (latest := state.latest_weights()) is not None else set()
        rows = rows_of(state) if state.baseline else []
        if len(rows) > 1:  # the round a rollback would return to
            keep.add(guard.best_round(rows, {int(r["round"]) for r in rows if r.get("guard_fired")}))
        return keep
    if category == "eval_videos" and finished:  # the report and contact sheet show round 0 next to the last round
        return {max(r.index for r in finished)}
    return set()


def prune(cfg: AnisoraConfig, state: AlignState, out: str) -> dict[str, int]:
    """Apply ``run.keep`` to the finished rounds of ``state``; records what it deleted in each round's
    ``pruned`` and returns the bytes freed now per category (the caller saves the state)."""
    finished = sorted((r for r in state.rounds if r.reached("evaluated")), key=lambda r: r.index)
    freed: dict[str, int] = {}
    for category in CATEGORIES:
        keep = getattr(cfg.run.keep, category)
        if keep == "all":
            continue
        kept = {r.index for r in finished[max(0, len(finished) - keep):]} if keep else set()
        kept |= protected(state, category)
        for rs in finished:
            if rs.index in kept or category in rs.pruned:
                continue
            paths = round_files(cfg, out, rs, category)
            n = sum(fs.remove(p) for p in paths)
            rs.pruned[category] = {"setting": f"run.keep.{category}={keep}", "bytes": n, "paths": paths,
                                   "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            if category == "candidate_videos" and rs.pairs_uri:
                mark_videos_pruned(rs.pairs_uri, rs.pruned[category])
            if category == "weights":
                _tag_model_version(cfg, rs)
            freed[category] = freed.get(category, 0) + n
            log.info("run.keep: round %d's %s pruned (%.1f MB; run.keep.%s=%s)", rs.index, category.replace("_", " "),
                     n / 1e6, category, keep)
    return freed


def _tag_model_version(cfg: AnisoraConfig, rs: RoundState) -> None:
    """The round's registered MLflow model version says that its files are gone."""
    version = rs.metrics.get("model_version")
    if not cfg.loop.registered_model or not version:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient().set_model_version_tag(cfg.loop.registered_model, str(int(version)), "anisora.pruned",
                                         rs.pruned["weights"]["setting"])


def free_gb(uri: str) -> float | None:
    """Free GB of the disk holding a local ``uri`` (its nearest existing folder); None for a URL."""
    path = fs.normalize(uri)
    if fs.is_url(path):
        return None
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free / 1e9


def largest_round_gb(state: AlignState) -> float:
    """The most any finished round of the job wrote to ``run.output_dir`` (``written_mb``, before pruning)."""
    return max((r.metrics.get("written_mb", 0.0) for r in state.rounds if r.reached("evaluated")), default=0.0) / 1e3


def check_free_space(cfg: AnisoraConfig, state: AlignState, index: int) -> float | None:
    """Before round ``index`` (0: the untrained generator's evaluation): the free GB of ``run.output_dir``'s disk,
    or ``DiskSpaceError`` when it is below ``run.free_space``, less what a resumed round already wrote (its checkpoints
    and weights need no room again). None: not checked."""
    setting = cfg.run.free_space
    free = free_gb(cfg.run.output_dir)
    if free is None or (setting.min_gb == 0 and setting.rounds == 0):
        return None
    largest = largest_round_gb(state)
    started = next((r.metrics["output_dir_start_mb"] for r in state.rounds
                    if r.index == index and "output_dir_start_mb" in r.metrics), None)
    written = 0.0 if started is None else max(0.0, fs.size(fs.normalize(cfg.run.output_dir)) / 1e6 - started) / 1e3
    need = max(0.0, max(setting.min_gb, setting.rounds * largest) - written)
    if free < need:
        why = (f"run.free_space.rounds={setting.rounds:g} x {largest:.2f} GB, the most a round of this job wrote"
               if setting.rounds * largest >= setting.min_gb else f"run.free_space.min_gb={setting.min_gb:g}")
        raise DiskSpaceError(
            f"run.output_dir = {cfg.run.output_dir!r}: {free:.2f} GB free, round {index} needs {need:.2f} GB ({why}). "
            "The job stopped before the round wrote anything (more) and its state is saved: free space (or keep "
            "less of each finished round with run.keep), then run again with --resume.")
    return free


def round_started(cfg: AnisoraConfig, rs: RoundState) -> None:
    """Note the output folder's size as round ``rs`` starts (once: a resumed round keeps its first note)."""
    if not fs.is_url(fs.normalize(cfg.run.output_dir)) and "output_dir_start_mb" not in rs.metrics:
        rs.metrics["output_dir_start_mb"] = fs.size(fs.normalize(cfg.run.output_dir)) / 1e6


def unrecorded_round(state: AlignState) -> RoundState | None:
    """The earliest evaluated round whose sizes ``record_sizes`` has not recorded (its job stopped before its pruning)."""
    pending = [r for r in state.rounds if r.reached("evaluated") and "pruned_mb" not in r.metrics]
    return min(pending, key=lambda r: r.index, default=None)


def record_sizes(cfg: AnisoraConfig, rs: RoundState, freed: dict[str, int]) -> list[str]:
    """After ``prune``: the output folder's size, what was just freed and, once, what round ``rs`` wrote (``written_mb``:
    its growth from its start to its end before pruning, i.e. the folder now plus what was just freed) into its
    metrics. Once the round is evaluated, and again when a resumed job prunes more; returns the keys to log."""
    if not rs.reached("evaluated") or not (freed or "pruned_mb" not in rs.metrics):
        return []
    freed_mb = sum(freed.values()) / 1e6
    rs.metrics["pruned_mb"] = rs.metrics.get("pruned_mb", 0.0) + freed_mb
    if fs.is_url(fs.normalize(cfg.run.output_dir)):  # sizing a bucket lists every object of the job, each round
        return ["pruned_mb"]
    rs.metrics["output_dir_mb"] = fs.size(fs.normalize(cfg.run.output_dir)) / 1e6
    if "output_dir_start_mb" in rs.metrics and "written_mb" not in rs.metrics:
        rs.metrics["written_mb"] = max(0.0, rs.metrics["output_dir_mb"] + freed_mb - rs.metrics["output_dir_start_mb"])
    return [k for k in ("pruned_mb", "output_dir_mb", "written_mb") if k in rs.metrics]
