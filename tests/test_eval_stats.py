"""The paired bootstrap over held-out prompts."""

import numpy as np
import pytest

from anisora_ray.eval.stats import paired_bootstrap


def test_a_consistent_gain_is_significant_and_noise_is_not():
    rng = np.random.default_rng(1)
    before = {f"p{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.6, 24))}
    gain = paired_bootstrap(before, {k: v + 0.05 + rng.normal(0, 0.01) for k, v in before.items()}, samples=4000)
    assert gain.p_value < 0.01 and gain.ci_low > 0 and gain.wins == 24
    assert gain.mean_diff == pytest.approx(0.05, abs=0.01)
    noise = paired_bootstrap(before, {k: v + rng.normal(0, 0.05) for k, v in before.items()}, samples=4000)
    assert noise.ci_low < 0 < noise.ci_high and noise.p_value > 0.05
    worse = paired_bootstrap(before, {k: v - 0.05 for k, v in before.items()})
    assert worse.p_value == 1.0 and worse.ci_high < 0


def test_only_prompts_scored_in_both_rounds_count():
    result = paired_bootstrap({"a": 0.1, "b": 0.2, "c": float("nan")}, {"a": 0.3, "b": 0.4, "c": 0.5, "d": 0.9})
    assert result.num_prompts == 2 and result.mean_diff == pytest.approx(0.2)
    with pytest.raises(ValueError, match=">= 2 prompts"):
        paired_bootstrap({"a": 0.1}, {"a": 0.2})
