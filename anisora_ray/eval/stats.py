"""Paired statistics over held-out prompts (no Ray, no torch)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedBootstrap:
    """Mean of (after - before) over prompts, its bootstrap CI and one-sided p-value (H0: no gain)."""

    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # share of bootstrap means <= 0
    num_prompts: int
    wins: int  # prompts whose reward rose

    def to_dict(self) -> dict[str, float]:
        return {"mean_diff": self.mean_diff, "ci_low": self.ci_low, "ci_high": self.ci_high, "p_value": self.p_value,
                "num_prompts": float(self.num_prompts), "wins": float(self.wins)}


def paired_bootstrap(before: Mapping[str, float], after: Mapping[str, float], samples: int = 2000,
                     seed: int = 0, confidence: float = 0.95) -> PairedBootstrap:
    """Resample prompts with replacement; the prompts present (and finite) in both rounds count."""
    common = sorted(k for k in before if k in after and np.isfinite(before[k]) and np.isfinite(after[k]))
    if len(common) < 2:
        raise ValueError(f"a paired bootstrap needs >= 2 prompts scored in both rounds, got {len(common)}")
    diff = np.array([after[k] - before[k] for k in common])
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(samples, len(diff)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return PairedBootstrap(
        mean_diff=float(diff.mean()), ci_low=float(np.quantile(means, tail)), ci_high=float(np.quantile(means, 1 - tail)),
        p_value=float((means <= 0).mean()), num_prompts=len(common), wins=int((diff > 0).sum()))
