"""Paired statistics over held-out prompts, with scipy (no Ray, no torch).

A round is compared with a baseline prompt by prompt (same prompts, same seeds): the per-prompt
differences are the sample. The confidence interval of their mean is scipy's BCa bootstrap over
prompts; the p-value is a paired sign-flip permutation test (``scipy.stats.permutation_test``,
exact when 2^n flips are few enough), two-sided, H0: the round changed nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 2**16  # up to 16 prompts every sign flip is enumerated


@dataclass(frozen=True)
class PairedComparison:
    """Mean of (after - before) over prompts, its BCa bootstrap CI and the paired permutation p-value."""

    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, sign-flip permutation test of the mean difference
    num_prompts: int
    wins: int  # prompts whose reward rose

    def to_dict(self) -> dict[str, float]:
        return {"mean_diff": self.mean_diff, "ci_low": self.ci_low, "ci_high": self.ci_high, "p_value": self.p_value,
                "num_prompts": float(self.num_prompts), "wins": float(self.wins)}


def scored_in_both(before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    """The prompts with a finite value in both rounds: what a paired comparison counts."""
    return sorted(k for k in before if k in after and np.isfinite(before[k]) and np.isfinite(after[k]))


def compare_or_nan(before: Mapping[str, float], after: Mapping[str, float], samples: int = 2000,
                   seed: int = 0) -> PairedComparison:
    """:func:`paired_comparison`, or NaN everywhere (the prompts still counted) when fewer than two prompts were
    scored in both rounds: a round whose held-out prompts were nearly all quarantined is reported, not failed."""
    common = scored_in_both(before, after)
    if len(common) < 2:
        nan = float("nan")
        return PairedComparison(nan, nan, nan, nan, num_prompts=len(common), wins=0)
    return paired_comparison(before, after, samples=samples, seed=seed)


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def paired_comparison(before: Mapping[str, float], after: Mapping[str, float], samples: int = 2000,
                      seed: int = 0, confidence: float = 0.95) -> PairedComparison:
    """The prompts present (and finite) in both count; ``samples`` resamples for the bootstrap and, past
    the exact limit, for the permutation test."""
    from scipy import stats

    common = scored_in_both(before, after)
    if len(common) < 2:
        raise ValueError(f"a paired comparison needs >= 2 prompts scored in both rounds, got {len(common)}")
    diff = np.array([after[k] - before[k] for k in common], dtype=float)
    mean = float(diff.mean())
    if np.ptp(diff) == 0.0:  # every prompt moved by the same amount: no spread to resample
        low = high = mean
    else:
        ci = stats.bootstrap((diff,), _mean, confidence_level=confidence, n_resamples=samples, method="BCa",
                             random_state=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    flips = 2 ** len(diff)
    test = stats.permutation_test((diff,), _mean, permutation_type="samples", alternative="two-sided",
                                  n_resamples=flips if flips <= EXACT_LIMIT else samples,
                                  random_state=np.random.default_rng(seed), vectorized=True)
    return PairedComparison(mean_diff=mean, ci_low=low, ci_high=high, p_value=float(test.pvalue),
                            num_prompts=len(common), wins=int((diff > 0).sum()))
