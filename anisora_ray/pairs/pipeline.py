"""The online pairs pipeline: one streaming Ray Data dataset from prompts to preference pairs.

prompts → K seeds each → generation on the **persistent** generator replicas (a thin Ray Data
stage forwards each batch to one replica actor; nothing reloads a model) → decode once → scoring:
by default (``pairs.reward_stage: actors``) a stage that sends each batch to the persistent reward
actors (:class:`anisora_ray.reward.actors.RewardActors`, every dimension in parallel), or with
``pipeline`` one Ray Data actor-pool stage per weighted dimension (its own resources, replicas and
batch size) → the driver groups rows by prompt as they stream in, aggregates, selects the pair and
writes shards (:mod:`anisora_ray.pairs.writer`). Ray Data's backpressure bounds what is in flight.
Every row carries ``error``: a failed generation or decode travels on as an error row (the
candidate is quarantined with its reason) so each prompt still sees its K rows and pairs from the rest.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from anisora_ray.config import AnisoraConfig, DimensionConfig, VideoConfig
from anisora_ray.errors import ImageLoadError, InfrastructureError, VideoDecodeError
from anisora_ray.generation.seeding import build_requests
from anisora_ray.io import fs
from anisora_ray.pairs.forward import NO_FRAMES, clip_batch, failure, generate_on_replicas, objects, score_on_actors
from anisora_ray.pairs.select import select_pair
from anisora_ray.pairs.writer import PairWriter
from anisora_ray.reward.actors import DimensionScorer
from anisora_ray.reward.aggregate import RewardAggregator, active_dimensions
from anisora_ray.reward.stage import decode_one
from anisora_ray.reward.statistics import RewardStatistics
from anisora_ray.runtime import first_line
from anisora_ray.types import Candidate, PromptItem, QuarantineRecord, ScoredCandidate

if TYPE_CHECKING:  # the stages below run in Ray Data workers: keep torch/diffusers out of their imports
    from anisora_ray.generation.replicas import GeneratorReplicas

log = logging.getLogger(__name__)
CANDIDATE_FIELDS = [f.name for f in fields(Candidate)]


def decode_clips(batch: dict[str, np.ndarray], video: dict) -> dict[str, np.ndarray]:
    """Ray Data stage: each clip decoded once (sampled, resized) with its first-frame image."""
    v = VideoConfig.model_validate(video)
    frames, images, errors = [], [], [failure(e) for e in batch["error"]]
    for i, uri in enumerate(batch["video_uri"]):
        clip = image = NO_FRAMES
        if not errors[i]:
            try:
                clip, image = decode_one(v, str(uri), str(batch["image_uri"][i]))
                image = image[None]
            except (VideoDecodeError, ImageLoadError) as exc:
                errors[i], clip, image = f"{type(exc).__name__}: {exc}", NO_FRAMES, NO_FRAMES
        frames.append(clip)
        images.append(image)
    out = dict(batch)
    out["error"] = np.array(errors, dtype=object)
    out["frames"] = objects(frames)
    out["image"] = objects(images)
    return out


class ScoreDimension:
    """Ray Data stage: one reward dimension over the decoded clips of a batch (error rows get NaN)."""

    def __init__(self, name: str, dimension: dict, last: bool = False, retries: int = 0):
        self.name, self.last, self.retries = name, last, retries  # the last stage drops the clips: they go no further
        self.scorer = DimensionScorer(name, DimensionConfig.model_validate(dimension))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, e in enumerate(batch["error"]) if not failure(e)]
        scores = np.full(len(batch["error"]), np.nan)
        for attempt in range(self.retries + 1) if ok else ():
            try:  # a non-finite score is content (quarantined downstream); an exception is infrastructure
                scores[ok] = self.scorer.score(clip_batch(batch, ok))
                break
            except Exception as exc:  # noqa: BLE001 - retried, then the run fails naming the dimension
                if attempt == self.retries:
                    raise InfrastructureError(f"reward dimension {self.name} failed {attempt + 1} time(s) on a batch of "
                                              f"{len(ok)} clips: {type(exc).__name__}: {first_line(exc)}") from exc
                log.warning("%s failed on a batch of %d clips (%s); scoring it again", self.name, len(ok), exc)
        out = {k: v for k, v in batch.items() if not (self.last and k in ("frames", "image"))}
        out[f"{self.name}_raw"] = scores
        return out


def build_dataset(cfg: AnisoraConfig, items: Sequence[PromptItem], replicas: GeneratorReplicas, out_dir: str,
                  round_index: int = 0, reward_actors=None, exact: bool = False) -> ray.data.Dataset:
    """The lazy streaming dataset; nothing runs until it is iterated. ``replicas`` brings its actors and the
    persistent router that leases them (``GeneratorReplicas.router``), which outlives the round. ``exact``: every
    step computed, whatever ``generator.cache``."""
    # One row per (prompt, seed), one block per prompt: expanded here rather than in a Ray Data stage,
    # which would be one more kind of worker to start per round.
    rows = [{"prompt_id": r.item.prompt_id, "prompt": r.item.prompt, "image_uri": r.item.image_uri,
             "character_id": r.item.character_id, "seed": s, "candidate_index": i}
            for r in build_requests(items, cfg, round_index) for i, s in enumerate(r.seeds)]
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(items)))
    g = cfg.generator
    tasks = max(1, -(-len(replicas.actors) * g.max_calls_in_flight // g.calls_per_task))
    ds = ds.map_batches(generate_on_replicas, batch_format="pyarrow",
                        batch_size=g.calls_per_task * g.prompts_per_call * g.candidates_per_prompt,
                        fn_kwargs={"replicas": replicas.actors, "router": replicas.router, "out_dir": out_dir,
                                   "timeout_s": g.call_timeout_s, "retries": g.call_retries,
                                   "prompts_per_call": g.prompts_per_call, "exact": exact},
                        compute=ray.data.TaskPoolStrategy(size=tasks), num_cpus=0)
    return score_stream(cfg, ds, reward_actors)


def score_stream(cfg: AnisoraConfig, ds: ray.data.Dataset, reward_actors=None) -> ray.data.Dataset:
    """Candidate rows (with ``error``) → decoded once → one actor-pool stage per weighted dimension
    (or, given persistent ``reward_actors``, one forwarding stage to their pools)."""
    p = cfg.pairs
    ds = ds.map_batches(decode_clips, batch_format="numpy", batch_size=p.decode_batch_size,
                        fn_kwargs={"video": cfg.video.model_dump()}, num_cpus=p.decode_cpus,
                        compute=ray.data.TaskPoolStrategy(size=p.decode_concurrency))
    if reward_actors is not None:
        ds = ds.map_batches(score_on_actors, batch_format="numpy", batch_size=cfg.reward.batch_size, num_cpus=0,
                            fn_kwargs={"pools": reward_actors.pools, "timeout_s": cfg.reward.batch_timeout_s,
                                       "retries": cfg.reward.batch_retries},
                            compute=ray.data.TaskPoolStrategy(size=p.reward_forwarders))
        return ds
    dims = cfg.reward.dimensions.as_dict()
    names = active_dimensions(dims)
    for name in names:
        d = dims[name]
        ds = ds.map_batches(ScoreDimension, batch_format="numpy", batch_size=d.batch_size or cfg.reward.batch_size,
                            fn_constructor_kwargs={"name": name, "dimension": d.model_dump(), "last": name == names[-1],
                                                   "retries": cfg.reward.batch_retries},
                            compute=ray.data.ActorPoolStrategy(size=d.replicas),
                            num_cpus=d.actor.num_cpus, num_gpus=d.actor.num_gpus or None,
                            resources=dict(d.actor.resources) or None, memory=d.actor.ray_options().get("memory"))
    return ds


def candidates_dataset(candidates: Sequence[Candidate]) -> ray.data.Dataset:
    """Already generated candidates (e.g. ``anisora-ray generate`` output) as pipeline rows."""
    table = Candidate.to_table(candidates).append_column("error", pa.array([""] * len(candidates), pa.string()))
    return ray.data.from_arrow(table)


@dataclass(frozen=True)
class PairsResult:
    out_uri: str
    pairs: int  # written by this run
    skipped: dict[str, int]  # reason -> prompts, this run
    already_done: int  # prompts found paired or skipped before this run
    candidates: int
    quarantined_candidates: int
    retried_candidates: int = 0  # candidates whose generation or scoring was sent again after an infrastructure failure


def score_group(rows: list[dict], aggregator: RewardAggregator) -> list[ScoredCandidate]:
    """One prompt's streamed rows → scored candidates (errors and invalid scores quarantined)."""
    names = active_dimensions(aggregator.dimensions)
    for r in rows:
        r["error"] = failure(r["error"])
    clean = [r for r in rows if not r["error"]]
    aggregated = aggregator([{n: r[f"{n}_raw"] for n in names} for r in clean])
    by_uri = {r["video_uri"]: i for i, r in enumerate(clean)}
    out = []
    for r in sorted(rows, key=lambda r: r["candidate_index"]):
        c = Candidate.from_dict({k: r[k] for k in CANDIDATE_FIELDS})
        i = by_uri.get(r["video_uri"]) if not r["error"] else None
        reason = r["error"] or (aggregated.reasons[i] and f"invalid score: {aggregated.reasons[i]}")
        reward = aggregated.rewards[i] if i is not None else None
        out.append(ScoredCandidate.from_candidate(
            c, raw_scores={n: r[f"{n}_raw"] for n in names} if i is not None else {},
            scores=aggregated.normalized[i] if i is not None else {},
            reward=float("nan") if reward is None else reward, quarantine_reason=reason or None))
    return out


def _configure_data_context(cfg: AnisoraConfig, progress: bool) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    if cfg.pairs.object_store_memory_mb:
        context.execution_options.resource_limits = context.execution_options.resource_limits.copy(
            object_store_memory=cfg.pairs.object_store_memory_mb * 2**20)


def consume(cfg: AnisoraConfig, dataset: ray.data.Dataset, writer: PairWriter, total: int, already: int,
            progress: bool = True, expected: dict[str, int] | None = None,
            on_prompt: Callable[[str], None] | None = None, statistics: RewardStatistics | None = None) -> PairsResult:
    """Group the streamed rows by prompt; each complete prompt is scored, paired and handed to ``writer``.
    z-scored dimensions need ``statistics`` fixed beforehand, so no reward depends on arrival order."""
    from tqdm.auto import tqdm

    k = cfg.generator.candidates_per_prompt
    aggregator = RewardAggregator(cfg.reward.dimensions.as_dict(), statistics)
    groups: dict[str, list[dict]] = defaultdict(list)
    skipped_reasons: Counter[str] = Counter()
    counts = Counter()

    def finish(prompt_id: str, rows: list[dict], bar) -> None:
        scored = score_group(rows, aggregator)
        counts["candidates"] += len(scored)
        counts["quarantined"] += sum(1 for s in scored if s.quarantine_reason)
        result = select_pair(prompt_id, scored, cfg.pairs)
        if isinstance(result, QuarantineRecord):
            skipped_reasons[result.reason] += 1
        aside = [QuarantineRecord(stage="pairs", item_id=prompt_id, reason=s.quarantine_reason.split(":", 1)[0],
                                  uri=s.video_uri, detail=f"seed {s.seed}: {s.quarantine_reason}"[:2000])
                 for s in scored if s.quarantine_reason]
        writer.add(result, scored if cfg.pairs.keep_scores else (), aside)
        if on_prompt:
            on_prompt(prompt_id)
        bar.update(1)
        bar.set_postfix(candidates=counts["candidates"], quarantined=counts["quarantined"], refresh=False)
        if writer.pending >= cfg.pairs.flush_every:
            writer.flush()

    with tqdm(total=total, desc="pairs", unit="prompt", disable=not progress) as bar:
        try:
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                for row in batch.to_pylist():
                    counts["retried"] += bool(row.get("retries"))
                    group = groups[row["prompt_id"]]
                    group.append(row)
                    if len(group) >= (expected or {}).get(row["prompt_id"], k):
                        finish(row["prompt_id"], groups.pop(row["prompt_id"]), bar)
        finally:  # what finished is kept, also when a component fails for good: --resume redoes only the rest
            writer.flush()
    if groups:  # rows lost on the way (not a content verdict): these prompts stay undone for --resume
        raise InfrastructureError(f"{len(groups)} prompt(s) did not get all their candidates back "
                                  f"({', '.join(sorted(groups)[:5])}); they are left for --resume")
    return PairsResult(writer.out_uri, writer.written["pairs"], dict(skipped_reasons), already, counts["candidates"],
                       counts["quarantined"], counts["retried"])


def stream_pairs(cfg: AnisoraConfig, items: Sequence[PromptItem], replicas: GeneratorReplicas, out_uri: str,
                 round_index: int = 0, progress: bool = True, on_prompt: Callable[[str], None] | None = None,
                 reward_actors=None, statistics: RewardStatistics | None = None, exact: bool = False) -> PairsResult:
    """Run the pipeline over the prompts not yet paired at ``out_uri``; write pairs as prompts complete. ``exact``:
    rollouts with every step computed, whatever ``generator.cache``."""
    writer = PairWriter(out_uri)
    already = len(writer.done)
    todo = [i for i in items if i.prompt_id not in writer.done]
    if cfg.pairs.max_prompts is not None:  # per output folder (a round): a resumed round pairs only what is left of it
        todo = round_order(todo, cfg.run.seed, round_index)[: max(0, cfg.pairs.max_prompts - already)]
    if not todo:
        return PairsResult(out_uri, 0, {}, already, 0, 0)
    _configure_data_context(cfg, progress)
    ray.get(replicas.router.reset.remote())  # leases an earlier stage's cancelled or killed tasks left behind
    dataset = build_dataset(cfg, todo, replicas, fs.normalize(out_uri), round_index, reward_actors, exact)
    return consume(cfg, dataset, writer, len(todo), already, progress, on_prompt=on_prompt, statistics=statistics)


def round_order(items: Sequence[PromptItem], seed: int, round_index: int) -> list[PromptItem]:
    """``items`` in an order drawn per (run seed, round): each round takes its own prompts from a manifest larger
    than ``pairs.max_prompts``, the same ones when it resumes."""
    def key(item: PromptItem) -> bytes:
        return hashlib.sha256(f"{seed}:{round_index}:{item.prompt_id}".encode()).digest()
    return sorted(items, key=key)


def pair_candidates(cfg: AnisoraConfig, candidates: Sequence[Candidate], out_uri: str, progress: bool = True,
                    reward_actors=None, statistics: RewardStatistics | None = None) -> PairsResult:
    """Pairs from candidates generated earlier (same scoring stages and rules, no generation)."""
    writer = PairWriter(out_uri)
    already = len(writer.done)
    todo = [c for c in candidates if c.prompt_id not in writer.done]
    prompts = list(dict.fromkeys(c.prompt_id for c in todo))
    if cfg.pairs.max_prompts is not None:  # per output folder, as in stream_pairs
        keep = set(prompts[: max(0, cfg.pairs.max_prompts - already)])
        todo, prompts = [c for c in todo if c.prompt_id in keep], [p for p in prompts if p in keep]
    if not todo:
        return PairsResult(out_uri, 0, {}, already, 0, 0)
    _configure_data_context(cfg, progress)
    expected = Counter(c.prompt_id for c in todo)
    dataset = score_stream(cfg, candidates_dataset(todo), reward_actors)
    return consume(cfg, dataset, writer, len(prompts), already, progress, expected, statistics=statistics)
