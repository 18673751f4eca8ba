"""Reward actors: one pool of Ray actors per dimension, each with its own resources."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import ray

from anisora_ray.config import DimensionConfig, RewardConfig
from anisora_ray.models.tiny_reward import resolve_backbones
from anisora_ray.reward.aggregate import active_dimensions
from anisora_ray.reward.base import ClipBatch, build_dimension, check_options
from anisora_ray.runtime import actor_placement, call_with_retries


class DimensionScorer:
    """Hosts one dimension's backend (plain Python; Ray wraps it below)."""

    def __init__(self, name: str, cfg: DimensionConfig):
        self.name, self.batch_size = name, cfg.batch_size
        self.dimension = build_dimension(name, cfg.backend, **cfg.options)
        threads = max(1, int(cfg.actor.num_cpus))
        if "torch" in sys.modules:  # learned backends; classical ones never pay torch's import
            sys.modules["torch"].set_num_threads(threads)
        if "cv2" in sys.modules:
            sys.modules["cv2"].setNumThreads(threads)

    def score(self, batch: ClipBatch) -> np.ndarray:
        """One score per clip; the backend sees at most the dimension's ``batch_size`` clips a call, all of one frame
        size (``video.sample_size: null`` keeps each clip's own)."""
        sizes = batch.sizes()
        if len(sizes) > 1:
            out = np.full(len(batch), np.nan)
            for indices in sizes.values():
                out[indices] = self.score(batch.take(indices))
            return out
        size = self.batch_size or len(batch)
        if len(batch) > size:
            return np.concatenate([self.score(batch.part(i, i + size)) for i in range(0, len(batch), size)])
        out = np.asarray(self.dimension.score(batch), dtype=float)
        if out.shape != (len(batch),):
            raise ValueError(f"{self.name} returned shape {out.shape} for a batch of {len(batch)} clips")
        return out


class DimensionActor(DimensionScorer):
    def placement(self) -> dict:
        return {"dimension": self.name, **actor_placement()}


class RewardActors:
    """Every weighted dimension's actor pool; scores one batch on all dimensions in parallel."""

    def __init__(self, cfg: RewardConfig, timeout_s: float = 600.0):
        remote = ray.remote(DimensionActor)
        self.pools: dict[str, list] = {}
        dimensions = cfg.dimensions.as_dict()
        for name in active_dimensions(dimensions):
            check_options(name, dimensions[name].backend, dimensions[name].options)
        for name in active_dimensions(dimensions):
            # Tiny backbones are built once here, not raced by every actor.
            dim = dimensions[name].model_copy(update={"options": resolve_backbones(dimensions[name].options)})
            self.pools[name] = [
                remote.options(**dim.actor.ray_options(), max_restarts=cfg.max_restarts).remote(name, dim)
                for _ in range(dim.replicas)
            ]
        self._next = {name: itertools.cycle(pool) for name, pool in self.pools.items()}
        refs = [a.placement.remote() for pool in self.pools.values() for a in pool]
        try:
            self._placements = ray.get(refs, timeout=timeout_s)
        except BaseException:  # unplaced or failed: none of the pools is left holding (or waiting for) resources
            self.shutdown()
            raise

    def placements(self) -> list[dict]:
        return list(self._placements)

    def submit(self, batch: ClipBatch) -> dict[str, tuple]:
        """Start scoring ``batch`` on every dimension; the clips go to the object store once. Returns per
        dimension (actor, clips, call) for :meth:`collect`."""
        clips = ray.put(batch)
        actors = {name: next(self._next[name]) for name in self.pools}
        return {name: (actor, clips, actor.score.remote(clips)) for name, actor in actors.items()}

    def collect(self, submitted: dict[str, tuple], retries: int, timeout_s: float | None = None) -> dict[str, list]:
        """The scores of a :meth:`submit`: a dead, restarting or hung actor is restarted (``max_restarts``) and
        the batch sent again, as the pairs pipeline's calls are (``runtime.call_with_retries``)."""
        out = {}
        for name, (actor, clips, first) in submitted.items():
            out[name], _ = call_with_retries(lambda a=actor, c=clips: a.score.remote(c), first=first,
                                             what=f"reward actor {name}", retries=retries, timeout_s=timeout_s,
                                             on_timeout=lambda a=actor: ray.kill(a, no_restart=False))
        return out

    def shutdown(self) -> None:
        for pool in self.pools.values():
            for actor in pool:
                ray.kill(actor)
        self.pools = {}
