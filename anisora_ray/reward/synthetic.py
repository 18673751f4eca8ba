"""A synthetic backend for benchmarks: a fixed wait per batch, standing in for a device-bound stage.

``backend: sleep`` with ``options: {seconds_per_batch: 0.2}`` holds the actor for that long per call
without using the CPU (as a GPU model would leave the host CPU free) and returns a deterministic
pseudo-score per clip. It measures the pipeline's own overhead; it scores nothing.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np

from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.types import DIMENSIONS


class FixedTimeDimension:
    def __init__(self, name: str, seconds_per_batch: float = 0.1):
        self.name = name
        self.seconds_per_batch = float(seconds_per_batch)

    def score(self, batch: ClipBatch) -> np.ndarray:
        time.sleep(self.seconds_per_batch)
        digests = [hashlib.sha256(clip[:, ::8, ::8].tobytes()).digest() for clip in batch.frames]
        return np.array([int.from_bytes(d[:4], "little") / 2**32 for d in digests])


def _factory(name: str):
    def build(seconds_per_batch: float = 0.1) -> FixedTimeDimension:
        return FixedTimeDimension(name, seconds_per_batch)

    return build


for _name in DIMENSIONS:
    register(_name, "sleep")(_factory(_name))
