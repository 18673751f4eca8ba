"""Per-dimension normalization and weighting into one reward in [0, 1]; pure, no Ray.

A NaN, infinite or missing score never becomes 0: its candidate is quarantined with the
dimension and the reason. Normalization never depends on the order rows arrive in: ``fixed`` maps
a configured range, ``zscore`` uses statistics frozen before scoring (:mod:`.statistics`), ``rank``
ranks within the rows of one call (one prompt's candidates when pairing).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from anisora_ray.config import DimensionConfig, NormalizeConfig
from anisora_ray.errors import ConfigError
from anisora_ray.reward.statistics import Moments, RewardStatistics, zscore_dimensions


@dataclass(frozen=True)
class Aggregated:
    """Per row: the normalized scores, the reward (None when quarantined) and the quarantine reason."""

    normalized: list[dict[str, float]]
    rewards: list[float | None]
    reasons: list[str | None]


def active_dimensions(dimensions: Mapping[str, DimensionConfig]) -> list[str]:
    """The dimensions that count: weight above 0."""
    return [name for name, d in dimensions.items() if d.weight > 0]


def invalid_reason(row: Mapping[str, float], dimensions: Sequence[str]) -> str | None:
    problems = []
    for name in dimensions:
        value = row.get(name)
        if value is None:
            problems.append(f"{name}: missing score")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
            problems.append(f"{name}: not a number: {value!r}")
        elif not math.isfinite(value):
            problems.append(f"{name}: non-finite score {value!r}")
    return "; ".join(problems) or None


def normalize(values: np.ndarray, cfg: NormalizeConfig, moments: Moments | None = None) -> np.ndarray:
    """Map raw scores of one dimension (all finite) to [0, 1]; ``zscore`` needs frozen ``moments``."""
    if values.size == 0:
        return values.astype(float)
    if cfg.kind == "fixed":
        return np.clip((values - cfg.low) / (cfg.high - cfg.low), 0.0, 1.0)
    if cfg.kind == "rank":
        if values.size == 1:
            return np.full(1, 0.5)
        return (_rankdata(values, method="average") - 1.0) / (values.size - 1.0)
    if moments is None:
        raise ConfigError("zscore normalization needs statistics fixed before scoring (reward.statistics_uri "
                          "or a calibration sample)")
    z = (values - moments.mean) / max(moments.std, 1e-8)
    return 1.0 / (1.0 + np.exp(-z))


def calibrate(rows: Sequence[Mapping[str, float]], dimensions: Mapping[str, DimensionConfig],
              what: str) -> RewardStatistics:
    """The z-scored dimensions' statistics from the rows (raw scores of one sample of ``what``) that get a reward:
    a row with a bad score in any weighted dimension is quarantined, so none of its scores count."""
    names = active_dimensions(dimensions)
    usable = [row for row in rows if invalid_reason(row, names) is None]
    return RewardStatistics.from_raw(usable, zscore_dimensions(dimensions), f"{len(usable)} {what}")


@dataclass
class RewardAggregator:
    """Normalizes each weighted dimension and combines them by their weights."""

    dimensions: dict[str, DimensionConfig]
    statistics: RewardStatistics | None = None  # frozen moments for the zscore dimensions

    def __post_init__(self) -> None:
        needed = zscore_dimensions(self.dimensions)
        if needed:
            if self.statistics is None:
                raise ConfigError(f"dimension(s) {needed} normalize by zscore: their statistics must be fixed before "
                                  "scoring (reward.statistics_uri, or the calibration sample align and pairs take)")
            self.statistics.require(needed)

    def __call__(self, rows: Sequence[Mapping[str, float]]) -> Aggregated:
        """``rows``: raw scores per candidate, ``{dimension: score}``."""
        names = active_dimensions(self.dimensions)
        reasons = [invalid_reason(row, names) for row in rows]
        valid = [i for i, reason in enumerate(reasons) if reason is None]
        normalized: list[dict[str, float]] = [{} for _ in rows]
        for name in names:
            values = np.array([float(rows[i][name]) for i in valid], dtype=float)
            moments = self.statistics.dimensions.get(name) if self.statistics else None
            for i, value in zip(valid, normalize(values, self.dimensions[name].normalize, moments), strict=True):
                normalized[i][name] = float(value)
        total = sum(self.dimensions[n].weight for n in names)
        rewards: list[float | None] = [None] * len(rows)
        for i in valid:
            rewards[i] = sum(self.dimensions[n].weight * normalized[i][n] for n in names) / total
        return Aggregated(normalized=normalized, rewards=rewards, reasons=reasons)


def _rankdata(values, *args, **kwargs):
    from scipy.stats import rankdata  # imported on use: scipy.stats costs ~0.6 s in every worker

    return rankdata(values, *args, **kwargs)
