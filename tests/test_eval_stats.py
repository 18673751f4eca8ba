"""Paired statistics over held-out prompts: BCa bootstrap CI and a sign-flip permutation p-value."""

import numpy as np
import pytest

from anisora_ray.eval.stats import paired_comparison


def prompts(values) -> dict[str, float]:
    return {f"p{i}": float(v) for i, v in enumerate(values)}


def test_a_consistent_gain_is_significant_noise_is_not_and_a_loss_is_named():
    rng = np.random.default_rng(1)
    before = prompts(rng.uniform(0.3, 0.6, 24))
    gain = paired_comparison(before, {k: v + 0.05 + rng.normal(0, 0.01) for k, v in before.items()}, samples=4000)
    assert gain.p_value < 0.001 and gain.ci_low > 0 and gain.wins == 24
    assert gain.mean_diff == pytest.approx(0.05, abs=0.01)
    noise = paired_comparison(before, {k: v + rng.normal(0, 0.05) for k, v in before.items()}, samples=4000)
    assert noise.ci_low < 0 < noise.ci_high and noise.p_value > 0.05
    worse = paired_comparison(before, {k: v - 0.05 + rng.normal(0, 0.01) for k, v in before.items()})
    assert worse.p_value < 0.001 and worse.ci_high < 0  # two-sided: a loss is as significant as a gain


def test_under_a_true_zero_effect_p_values_are_uniform_and_intervals_cover():
    from scipy import stats

    rng = np.random.default_rng(7)
    p_values, covered = [], 0
    for trial in range(300):  # 12 prompts: the permutation test is exact (4096 sign flips)
        before = prompts(rng.uniform(0.3, 0.6, 12))
        result = paired_comparison(before, {k: v + rng.normal(0, 0.03) for k, v in before.items()}, samples=500,
                                   seed=trial)
        p_values.append(result.p_value)
        covered += result.ci_low <= 0.0 <= result.ci_high
    p_values = np.array(p_values)
    assert 0.02 <= (p_values < 0.05).mean() <= 0.09  # ~5% false positives at the 5% level
    assert stats.kstest(p_values, "uniform").pvalue > 0.01  # not the old "share of bootstrap means <= 0"
    assert 0.88 <= covered / 300 <= 0.98  # a 95% interval covers the true zero ~95% of the time


def test_exact_p_value_for_a_tiny_sample_and_the_degenerate_cases():
    result = paired_comparison(prompts([0, 0, 0]), prompts([0.1, 0.2, 0.3]))
    assert result.p_value == pytest.approx(2 / 8)  # of 8 sign flips, only all-+ and all-- are as extreme
    same = paired_comparison(prompts([0.1, 0.2]), prompts([0.3, 0.4]))
    assert (same.ci_low, same.ci_high) == pytest.approx((0.2, 0.2))  # no spread: the interval is the point


def test_only_prompts_scored_in_both_rounds_count():
    result = paired_comparison({"a": 0.1, "b": 0.2, "c": float("nan")}, {"a": 0.3, "b": 0.5, "c": 0.5, "d": 0.9})
    assert result.num_prompts == 2 and result.mean_diff == pytest.approx(0.25)
    with pytest.raises(ValueError, match=">= 2 prompts"):
        paired_comparison({"a": 0.1}, {"a": 0.2})


def test_a_round_with_fewer_than_two_prompts_scored_in_both_gets_a_nan_row_and_a_warning(caplog):
    """A round whose held-out prompts were nearly all quarantined is reported (NaN comparison), not failed: its
    evaluation would fail again on every resume, with the same seeds and weights."""
    import math

    from anisora_ray.eval.heldout import EvalResult
    from anisora_ray.eval.stats import compare_or_nan
    from anisora_ray.loop.samples import eval_row

    baseline = {"a": 0.4, "b": 0.5}
    result = EvalResult(per_prompt={"a": 0.6, "b": float("nan")}, dimensions={}, mean_reward=0.6, scores_uri="scores",
                        candidates=4, quarantined=2, weights_version=1)
    with caplog.at_level("WARNING", logger="anisora_ray.loop.samples"):
        row = eval_row(1, result, baseline, samples=200, seed=0)
    assert row["num_prompts"] == 1.0 and row["wins"] == 0.0 and row["heldout_reward"] == 0.6
    assert all(math.isnan(row[k]) for k in ("mean_diff", "ci_low", "ci_high", "p_value"))
    assert "round 1: 1 held-out prompt(s) scored in both" in caplog.text
    full = compare_or_nan(baseline, {"a": 0.6, "b": 0.8}, samples=200)  # two prompts: the real comparison
    assert full == paired_comparison(baseline, {"a": 0.6, "b": 0.8}, samples=200)


def test_a_round_is_compared_with_round_0_over_the_seeds_both_scored():
    """A held-out candidate quarantined in one round only (no character detected, say) leaves the comparison of its
    prompt: a round better by 0.05 on every seed both scored shows +0.05, not a loss from comparing other seeds."""
    from anisora_ray.eval.heldout import EvalResult
    from anisora_ray.loop.samples import eval_row

    base = {f"p{i}": {"0": 0.40 + 0.01 * i, "1": 0.60 + 0.01 * i} for i in range(5)}
    now = {p: {s: v + 0.05 for s, v in seeds.items()} for p, seeds in base.items()}
    del now["p0"]["0"]  # quarantined this round: p0 keeps its high seed only
    means = {p: sum(v.values()) / len(v) for p, v in now.items()}
    result = EvalResult(per_prompt=means, dimensions={}, mean_reward=sum(means.values()) / 5, scores_uri="s",
                        candidates=10, quarantined=1, weights_version=1, per_candidate=now)
    baseline = {p: sum(v.values()) / len(v) for p, v in base.items()}
    row = eval_row(1, result, baseline, samples=200, seed=0, baseline_candidates=base)
    assert row["mean_diff"] == pytest.approx(0.05) and row["wins"] == 5 and row["num_prompts"] == 5
    assert eval_row(1, result, baseline, samples=200, seed=0)["mean_diff"] > 0.05  # a state from before: per prompt
