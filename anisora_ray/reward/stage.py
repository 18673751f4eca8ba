"""The scoring stage's entry functions: candidates in, scored candidates (and quarantine) out."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from anisora_ray.config import AnisoraConfig, VideoConfig
from anisora_ray.errors import ConfigError, ImageLoadError, VideoDecodeError
from anisora_ray.io import fs
from anisora_ray.io.images import load_image
from anisora_ray.io.video import read_clip
from anisora_ray.reward.actors import RewardActors
from anisora_ray.reward.aggregate import RewardAggregator, active_dimensions, calibrate
from anisora_ray.reward.base import ClipBatch
from anisora_ray.reward.statistics import RewardStatistics, configured_statistics, zscore_dimensions
from anisora_ray.types import Candidate, QuarantineRecord, ScoredCandidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoringResult:
    scored: list[ScoredCandidate]  # every candidate; quarantined ones carry a reason and NaN reward
    quarantined: list[QuarantineRecord]
    scores_uri: str | None = None
    statistics: RewardStatistics | None = None  # what the zscore dimensions were normalized with


def decode_one(video: VideoConfig, video_uri: str, image_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """One clip as the reward sees it (sampled, resized) and its first-frame image; raises
    VideoDecodeError / ImageLoadError naming the file."""
    clip = read_clip(video_uri, video.sample_frames, video.sample_max_frames, video.sample_size)
    return clip, np.asarray(load_image(image_uri))


def decode_batch(cfg: AnisoraConfig, candidates: Sequence[Candidate]) -> tuple[list[Candidate], ClipBatch, dict[str, str]]:
    """Decode each clip once; a clip or image that fails is left out with its reason."""
    kept, frames, images, failed = [], [], [], {}
    for c in candidates:
        try:
            clip, image = decode_one(cfg.video, c.video_uri, c.image_uri)
        except (VideoDecodeError, ImageLoadError) as exc:
            failed[c.video_uri] = f"{type(exc).__name__}: {exc}"
            continue
        kept.append(c)
        frames.append(clip)
        images.append(image)
    batch = ClipBatch(frames=frames, prompts=[c.prompt for c in kept], images=images, references=[None] * len(kept),
                      character_ids=[c.character_id for c in kept])
    return kept, batch, failed


def score_candidates(
    cfg: AnisoraConfig, candidates: Sequence[Candidate], actors: RewardActors, progress: bool = True,
    statistics: RewardStatistics | None = None,
) -> ScoringResult:
    """Scores on every weighted dimension, normalized and combined; bad clips are quarantined.

    z-scored dimensions use ``statistics``; without them, the statistics of this whole set (taken
    at once, so independent of order), returned with the result for later calls to reuse."""
    size = cfg.reward.batch_size
    chunks = deque(candidates[i : i + size] for i in range(0, len(candidates), size))
    raw: dict[str, dict[str, float]] = {}
    reasons: dict[str, str] = {}
    in_flight: deque = deque()
    with tqdm(total=len(candidates), desc="score", unit="clip", disable=not progress) as bar:
        while chunks or in_flight:
            while chunks and len(in_flight) < cfg.reward.batches_in_flight:
                kept, batch, failed = decode_batch(cfg, chunks.popleft())
                reasons.update(failed)
                bar.update(len(failed))
                if kept:
                    in_flight.append((kept, actors.submit(batch)))
            if not in_flight:
                continue
            kept, submitted = in_flight.popleft()
            results = actors.collect(submitted, cfg.reward.batch_retries, cfg.reward.batch_timeout_s)
            for j, c in enumerate(kept):
                raw[c.video_uri] = {name: float(values[j]) for name, values in results.items()}
            bar.update(len(kept))
    scorable = [c for c in candidates if c.video_uri in raw]
    dimensions = cfg.reward.dimensions.as_dict()
    rows = [raw[c.video_uri] for c in scorable]
    if statistics is None and zscore_dimensions(dimensions):
        try:
            statistics = calibrate(rows, dimensions, "scored candidates")
        except ConfigError as exc:
            if not reasons:
                raise
            # too few to calibrate because clips could not be read: that is what to fix, so it is named
            raise ConfigError(f"{exc}; {len(reasons)} of {len(candidates)} candidate(s) could not be scored: "
                              + "; ".join(f"{uri}: {why}" for uri, why in list(reasons.items())[:3])) from None
    aggregated = RewardAggregator(dimensions, statistics)(rows)
    for c, reason in zip(scorable, aggregated.reasons, strict=True):
        if reason:
            reasons[c.video_uri] = f"invalid score: {reason}"
    by_uri = {c.video_uri: i for i, c in enumerate(scorable)}
    scored, quarantined = [], []
    for c in candidates:
        i = by_uri.get(c.video_uri)
        reward = aggregated.rewards[i] if i is not None else None
        record = ScoredCandidate.from_candidate(
            c,
            raw_scores=raw.get(c.video_uri, {}),
            scores=aggregated.normalized[i] if i is not None else {},
            reward=float("nan") if reward is None else reward,
            quarantine_reason=reasons.get(c.video_uri),
        )
        scored.append(record)
        if record.quarantine_reason:
            quarantined.append(QuarantineRecord("reward", f"{c.prompt_id}/{c.seed}", record.quarantine_reason.split(":")[0],
                                                uri=c.video_uri, detail=record.quarantine_reason))
    return ScoringResult(scored, quarantined, statistics=statistics)


def scores_table(scored: Sequence[ScoredCandidate], dimensions: Sequence[str]) -> pa.Table:
    """ScoredCandidate columns plus one flat column per dimension (normalized) and ``<dim>_raw``."""
    table = ScoredCandidate.to_table(scored)
    for name in dimensions:
        table = table.append_column(name, pa.array([s.scores.get(name) for s in scored], pa.float64()))
        table = table.append_column(f"{name}_raw", pa.array([s.raw_scores.get(name) for s in scored], pa.float64()))
    return table


def run_scoring(cfg: AnisoraConfig, candidates_uri: str, out_uri: str | None, progress: bool = True) -> ScoringResult:
    """What ``anisora-ray score`` does: start the reward actors, score every candidate, write the table."""
    from anisora_ray.runtime import init_ray

    candidates = Candidate.from_table(fs.read_table(candidates_uri))
    out_uri = out_uri or fs.join(fs.normalize(cfg.run.output_dir), "score", "scores.parquet")
    statistics = configured_statistics(cfg.reward)
    init_ray(cfg.ray)
    actors = RewardActors(cfg.reward)
    try:
        result = score_candidates(cfg, candidates, actors, progress=progress, statistics=statistics)
    finally:
        actors.shutdown()
    fs.write_table(scores_table(result.scored, active_dimensions(cfg.reward.dimensions.as_dict())), out_uri)
    if result.quarantined:
        log.warning("%d candidate(s) quarantined; reasons in %s", len(result.quarantined), out_uri)
    return replace(result, scores_uri=out_uri)
