"""Frozen per-dimension statistics for data-dependent normalization (``normalize.kind: zscore``).

A z-score computed from whatever arrived first depends on scheduling: the same candidates would get
different rewards in another order. So the statistics are fixed before any pairing — from a stored
file (``reward.statistics_uri``) or from a calibration sample scored with the untrained generator
(in ``align``: the round-0 held-out evaluation) — and every later round, pairing and evaluation alike,
uses the same numbers. That also makes held-out z-scores comparable across rounds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from anisora_ray.config import DimensionConfig
from anisora_ray.errors import ConfigError
from anisora_ray.io import fs

FILENAME = "reward-statistics.json"


def configured_statistics(reward) -> RewardStatistics | None:
    """The statistics file ``reward.statistics_uri`` names (``reward``: RewardConfig), or None."""
    return RewardStatistics.load(reward.statistics_uri) if reward.statistics_uri else None


def frozen_statistics(reward, uri: str | None) -> RewardStatistics | None:
    """``reward.statistics_uri`` when configured, else the statistics saved at ``uri`` (None when neither)."""
    configured = configured_statistics(reward)
    if configured is not None or not uri:
        return configured
    return RewardStatistics.load(uri)


def zscore_dimensions(dimensions: Mapping[str, DimensionConfig]) -> list[str]:
    """The weighted dimensions whose normalization needs statistics."""
    return [n for n, d in dimensions.items() if d.weight > 0 and d.normalize.kind == "zscore"]


@dataclass(frozen=True)
class Moments:
    mean: float
    std: float
    count: int


SPREAD = 1e-9  # a std at most this times |mean| (or 1) is rounding over equal scores, not a spread to z-score by


def has_spread(m: Moments) -> bool:
    """Whether the scores vary: the std of equal floats is often ~1e-16, not 0."""
    return m.std > SPREAD * max(1.0, abs(m.mean))


@dataclass(frozen=True)
class RewardStatistics:
    """Mean and standard deviation of each dimension's raw score, and where they came from."""

    dimensions: dict[str, Moments] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_raw(cls, rows: Sequence[Mapping[str, float]], names: Sequence[str], source: str) -> RewardStatistics:
        """From raw scores (rows of ``{dimension: score}``; non-finite ones are left out). The set is
        taken as a whole, so its order does not matter."""
        out = {}
        for name in names:
            values = np.array([float(r[name]) for r in rows if name in r and math.isfinite(float(r[name]))])
            if values.size < 2:
                raise ConfigError(f"reward statistics for {name!r}: {values.size} finite score(s) in {source}, "
                                  f"need at least 2 (score more calibration candidates)")
            out[name] = Moments(float(values.mean()), float(values.std()), int(values.size))
            if not has_spread(out[name]):  # a z-score would turn any later difference into a reward of 0 or 1
                raise ConfigError(f"reward statistics for {name!r}: all {values.size} scores in {source} equal "
                                  f"{values[0]:.6g}, so there is no spread to z-score by (a constant scorer, or too "
                                  "alike a calibration sample: use more calibration prompts or normalize.kind fixed)")
        return cls(out, source)

    def require(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.dimensions]
        if missing:
            raise ConfigError(f"reward statistics from {self.source or 'nowhere'} lack {missing}: "
                              f"z-scored dimensions need their mean and std fixed before scoring")

    def save(self, uri: str) -> str:
        payload = {"source": self.source, "dimensions": {k: asdict(v) for k, v in self.dimensions.items()}}
        fs.write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True).encode())
        return uri

    @classmethod
    def load(cls, uri: str) -> RewardStatistics:
        try:
            payload = json.loads(fs.read_bytes(uri))
            dims = {k: Moments(float(v["mean"]), float(v["std"]), int(v["count"]))
                    for k, v in payload["dimensions"].items()}
        except FileNotFoundError as exc:
            raise ConfigError(f"reward statistics file {uri} does not exist") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"reward statistics file {uri} is not valid: {exc}") from exc
        bad = [k for k, m in dims.items() if not (math.isfinite(m.mean) and math.isfinite(m.std) and has_spread(m))]
        if bad:
            raise ConfigError(f"reward statistics file {uri}: non-finite mean, or no spread (std {SPREAD:g} x |mean| "
                              f"or less), for {bad}")
        return cls(dims, payload.get("source", uri))
