"""What a round leaves behind besides its state: sample videos and tables in MLflow, its held-out row,
and runs a killed driver left open."""

from __future__ import annotations

import logging
import os

from anisora_ray.config import AnisoraConfig
from anisora_ray.eval.cache_audit import AUDIT_SIDE_BY_SIDE, CacheAudit
from anisora_ray.eval.compare import paired_means
from anisora_ray.eval.heldout import EvalResult
from anisora_ray.eval.stats import compare_or_nan
from anisora_ray.io import fs
from anisora_ray.loop.report import side_by_side, side_by_side_videos
from anisora_ray.pairs.writer import read_pairs, shard_tables

log = logging.getLogger(__name__)


def eval_row(index: int, result: EvalResult, baseline: dict[str, float] | None, samples: int, seed: int,
             baseline_candidates: dict[str, dict[str, float]] | None = None) -> dict:
    """Round ``index``'s held-out row: its metrics and, given round 0's per-prompt rewards (and per candidate: then
    each prompt is compared over the seeds both rounds scored), the paired comparison (NaN, with a warning, when
    fewer than two prompts were scored in both rounds)."""
    row = {"round": index, **result.metrics(), "weights_version": result.weights_version}
    if baseline is not None:
        before, after = baseline, result.per_prompt
        if baseline_candidates and result.per_candidate:
            before, after = paired_means(baseline_candidates, result.per_candidate)  # the seeds both scored
        comparison = compare_or_nan(before, after, samples=samples, seed=seed)
        if comparison.num_prompts < 2:
            log.warning("round %d: %d held-out prompt(s) scored in both this round and round 0: no paired comparison "
                        "(each candidate's quarantine reason: %s)", index, comparison.num_prompts, result.scores_uri)
        row.update(comparison.to_dict())
    return row


def log_samples(cfg: AnisoraConfig, pairs_uri: str, out: str) -> None:
    """The round's pair tables (each kind's shards as one table: a real round's hundreds of shards were as many
    artifacts, copied into the store every round) and side-by-side winner | loser videos, as artifacts of the
    round's run."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as folder:
        for kind, table in shard_tables(pairs_uri).items():
            path = os.path.join(folder, f"{kind}.parquet")
            fs.write_table(table, path)
            mlflow.log_artifact(path, artifact_path="pairs")
    for pair in read_pairs(pairs_uri)[: cfg.eval.sample_videos]:
        uri = side_by_side(pair, fs.join(out, f"{pair.prompt_id}-winner-vs-loser.mp4"), cfg.generator.fps)
        if not fs.is_url(uri):
            mlflow.log_artifact(uri, artifact_path="pairs")


def log_audit(audit: CacheAudit, fps: int) -> None:
    """The cache audit's table and its most-moved video (with the cache | every step computed), as artifacts of the
    active MLflow run (the round's; round 0's: the job's)."""
    import mlflow

    if fs.is_url(audit.uri):
        return
    mlflow.log_artifact(audit.uri, artifact_path="cache_audit")
    if audit.rows:
        worst = max(audit.rows, key=lambda r: r["drift_mean_levels"])
        name = f"{worst['prompt_id']}-{worst['seed']}-cached-vs-exact.mp4"
        uri = side_by_side_videos(worst["video_cached"], worst["video_exact"],
                                  os.path.join(os.path.dirname(audit.uri), AUDIT_SIDE_BY_SIDE, name), fps)
        mlflow.log_artifact(uri, artifact_path="cache_audit")


def close_orphans(parent_run_id: str, keep: str) -> None:
    """Mark runs a killed driver left RUNNING under ``parent_run_id`` as KILLED, except ``keep`` (the
    training run a resumed round continues)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    for orphan in client.search_runs([parent.info.experiment_id],
                                     f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        if orphan.info.run_id != keep:
            client.set_terminated(orphan.info.run_id, status="KILLED")
