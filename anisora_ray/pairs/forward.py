"""The pipeline's forwarding stages, as Ray Data *tasks* that send work to actors living for the whole job.

A round is one Ray Data dataset; an actor-pool stage would start its own worker processes for every
dataset (a fixed start-up per round: seconds before the first pair on a small machine). These stages
are plain functions instead: Ray runs them on its pooled workers, which stay warm from round to
round. State that must outlive a round lives in persistent actors: the generator replicas, a
``runtime.LeastLoaded`` router that leases the least-loaded replica for each call, and the reward actors.
Modules that Ray Data workers unpickle keep torch, diffusers and scipy out of their imports.
"""

from __future__ import annotations

import random
import zlib
from collections import defaultdict

import numpy as np
import pyarrow as pa
import ray

from anisora_ray.generation.replicas import generate_call
from anisora_ray.reward.base import ClipBatch
from anisora_ray.runtime import call_with_retries
from anisora_ray.types import Candidate, GenerationRequest, PromptItem

NO_FRAMES = np.zeros((1, 1, 1, 3), np.uint8)  # what an error row carries in place of a clip


def failure(error) -> str:
    """A row's error as a string, "" when there is none (whatever Arrow/numpy made of an empty value)."""
    return error if isinstance(error, str) else ""


def clip_batch(batch: dict[str, np.ndarray], ok: list[int]) -> ClipBatch:
    """The decoded clips of rows ``ok`` of a stage batch."""
    return ClipBatch(frames=[batch["frames"][i] for i in ok], prompts=[str(batch["prompt"][i]) for i in ok],
                     images=[batch["image"][i][0] for i in ok], references=[None] * len(ok),
                     character_ids=[text_or_none(batch["character_id"][i]) if "character_id" in batch else None
                                    for i in ok])


def text_or_none(value) -> str | None:
    return value if isinstance(value, str) and value else None


def objects(arrays: list[np.ndarray]) -> np.ndarray:
    holder = np.empty(len(arrays), dtype=object)
    holder[:] = arrays
    return holder


def _lease(router, count: int, avoid: tuple[int, ...] = ()) -> int:
    try:
        return ray.get(router.lease.remote(avoid), timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # only spreads the load: any replica will do
        return random.choice([i for i in range(count) if i not in avoid] or range(count))


def generate_on_replicas(batch: pa.Table, replicas: list, router, out_dir: str, timeout_s: float | None = None,
                         retries: int = 0, prompts_per_call: int = 0, exact: bool = False) -> pa.Table:
    """Ray Data stage: the batch's (prompt, seed) rows as calls of ``prompts_per_call`` prompts (0: one call),
    each to the least-loaded persistent replica, all in flight at once (one worker process waits for
    several calls: fewer processes on the driver's node at scale). ``exact``: every step computed, whatever
    ``generator.cache``.

    Rows of candidates that failed carry ``error`` (quarantined downstream) so every prompt sees its K rows."""
    rows = batch.to_pylist()
    seeds: dict[str, list[int]] = defaultdict(list)
    items: dict[str, PromptItem] = {}
    for r in rows:
        items[r["prompt_id"]] = PromptItem(r["prompt_id"], r["prompt"], r["image_uri"], r.get("character_id"))
        seeds[r["prompt_id"]].append(int(r["seed"]))
    requests = [GenerationRequest(items[p], tuple(s)) for p, s in seeds.items()]
    size = prompts_per_call or len(requests)
    groups = [requests[i: i + size] for i in range(0, len(requests), size)]
    leased: list[int] = []  # per call: the replica it holds a lease on (taken inside the try: all released)
    tried: list[list[int]] = []  # per call: the replicas it was sent to
    candidates, quarantined, retried = [], [], 0
    failed_at_last: dict[int, bool] = {}  # per call: whether its last replica failed it (for the router)

    def resend(g: int) -> ray.ObjectRef:  # a call that failed goes to another replica while there is one
        router.release.remote(leased[g], failed=True)
        leased[g] = _lease(router, len(replicas), avoid=tuple(tried[g]))
        tried[g].append(leased[g])
        return generate_call(replicas[leased[g]], groups[g], out_dir, exact)

    try:
        for _ in groups:
            leased.append(_lease(router, len(replicas)))
            tried.append([leased[-1]])
        refs = [generate_call(replicas[index], group, out_dir, exact)
                for index, group in zip(leased, groups, strict=True)]
        for g, ref in enumerate(refs):
            failed_at_last[g] = True
            (made, failed), tries = call_with_retries(  # a hung replica is restarted (killed), the call sent again
                lambda g=g: resend(g), first=ref, retries=retries, timeout_s=timeout_s,
                what=lambda g=g: f"generator call of prompts {[r.item.prompt_id for r in groups[g]][:4]} "
                                 f"(replicas {tried[g]})",
                on_timeout=lambda g=g: ray.kill(replicas[leased[g]], no_restart=False))
            failed_at_last[g] = False
            candidates += made
            quarantined += failed
            retried += tries
    finally:  # a call never waited for (an earlier one failed for good) says nothing of its replica
        for g, index in enumerate(leased):
            router.release.remote(index, failed=failed_at_last.get(g))
    made = {(c.prompt_id, c.seed): c for c in candidates}
    failed = {q.item_id: f"generation failed: {q.reason}: {q.detail}" for q in quarantined}
    out, errors = [], []
    for r in rows:
        c = made.get((r["prompt_id"], int(r["seed"])))
        if c is None:
            c = Candidate(r["prompt_id"], r["prompt"], r["image_uri"], int(r["seed"]), int(r["candidate_index"]),
                          video_uri="", weights_version=-1, num_frames=0, height=0, width=0, fps=0,
                          frames_sha256="", replica_id="", generate_seconds=0.0, encode_seconds=0.0,
                          character_id=r.get("character_id"))
        out.append(c)
        errors.append("" if (c.prompt_id, c.seed) in made else failed.get(c.prompt_id, "generation failed"))
    return (Candidate.to_table(out).append_column("error", pa.array(errors, pa.string()))
            .append_column("retries", pa.array([retried] * len(out), pa.int64())))


def score_on_actors(batch: dict[str, np.ndarray], pools: dict[str, list], timeout_s: float | None = None,
                    retries: int = 0) -> dict[str, np.ndarray]:
    """Ray Data stage ("actors" mode): a batch goes to the object store once and to every dimension's
    persistent actor pool in parallel; the scores come back as ``<dim>_raw`` columns."""
    n = len(batch["error"])
    ok = [i for i, e in enumerate(batch["error"]) if not failure(e)]
    out = {k: v for k, v in batch.items() if k not in ("frames", "image")}
    scores = {name: np.full(n, np.nan) for name in pools}
    retried = 0
    if ok:
        clips = ray.put(clip_batch(batch, ok))
        turn = zlib.crc32(str(batch["video_uri"][ok[0]]).encode())  # spreads batches over each pool's actors
        actors = {name: pool[turn % len(pool)] for name, pool in pools.items()}
        refs = {name: actor.score.remote(clips) for name, actor in actors.items()}  # all dimensions in parallel
        for name, actor in actors.items():  # a dead or hung actor is restarted (max_restarts), the batch sent again
            scores[name][ok], tries = call_with_retries(
                lambda a=actor: a.score.remote(clips), first=refs[name], what=f"reward actor {name}",
                retries=retries, timeout_s=timeout_s, on_timeout=lambda a=actor: ray.kill(a, no_restart=False))
            retried += tries
    for name, values in scores.items():
        out[f"{name}_raw"] = values
    out["retries"] = np.asarray(batch["retries"]) + retried if "retries" in batch else np.full(n, retried)
    return out
