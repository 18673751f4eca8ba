import math

import numpy as np
import pytest

from anisora_ray.config import DimensionConfig, NormalizeConfig, load_config
from anisora_ray.errors import ConfigError
from anisora_ray.reward.aggregate import RewardAggregator, normalize
from anisora_ray.reward.statistics import Moments, RewardStatistics
from anisora_ray.types import DIMENSIONS
from tests.conftest import LOCAL_CONFIG


def dims(**weights):
    return {name: DimensionConfig(weight=w, normalize=NormalizeConfig(low=0, high=10)) for name, w in weights.items()}


def test_fixed_range_and_weights_combine_into_0_1():
    agg = RewardAggregator(dims(visual_motion=3.0, visual_appeal=1.0))
    out = agg([{"visual_motion": 5, "visual_appeal": 10}, {"visual_motion": 20, "visual_appeal": -4}])
    assert out.normalized[0] == {"visual_motion": 0.5, "visual_appeal": 1.0}
    assert out.rewards[0] == pytest.approx((3 * 0.5 + 1 * 1.0) / 4)
    assert out.normalized[1] == {"visual_motion": 1.0, "visual_appeal": 0.0}  # clipped
    assert out.rewards[1] == pytest.approx(0.75)
    assert out.reasons == [None, None]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_bad_score_quarantines_the_candidate_not_zero(bad):
    agg = RewardAggregator({"visual_motion": DimensionConfig(normalize=NormalizeConfig(kind="rank")),
                            "character": DimensionConfig()})
    rows = [{"visual_motion": 1.0, "character": 0.5}, {"visual_motion": bad, "character": 0.5},
            {"visual_motion": 3.0, "character": 0.5}]
    if bad is None:
        del rows[1]["visual_motion"]
    out = agg(rows)
    assert out.rewards[1] is None and "visual_motion" in out.reasons[1]
    assert out.normalized[1] == {}
    # the bad row takes no part in the ranking of the others: they span the full [0, 1]
    assert out.normalized[0]["visual_motion"] == 0.0 and out.normalized[2]["visual_motion"] == 1.0


def test_zero_weight_dimension_is_ignored_even_if_nan():
    agg = RewardAggregator(dims(visual_motion=1.0, text_video=0.0))
    out = agg([{"visual_motion": 5, "text_video": math.nan}])
    assert out.rewards == [0.5] and out.reasons == [None]


def test_rank_handles_ties_and_single_rows():
    cfg = NormalizeConfig(kind="rank")
    assert list(normalize(np.array([3.0, 1.0, 3.0]), cfg)) == [0.75, 0.0, 0.75]
    assert list(normalize(np.array([7.0]), cfg)) == [0.5]


def zscored(**weights):
    return {name: DimensionConfig(weight=w, normalize=NormalizeConfig(kind="zscore")) for name, w in weights.items()}


def test_zscore_uses_frozen_statistics_and_refuses_to_run_without_them(tmp_path):
    stats = RewardStatistics.from_raw([{"character": 0.0}, {"character": 2.0}, {"character": float("nan")}],
                                      ["character"], "a test")
    assert stats.dimensions["character"] == Moments(1.0, 1.0, 2)  # the NaN takes no part
    agg = RewardAggregator(zscored(character=1.0), stats)
    out = agg([{"character": 2.0}, {"character": 1.0}])
    assert out.normalized[0]["character"] == pytest.approx(1 / (1 + math.exp(-1.0)))
    assert out.normalized[1]["character"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match=r"\['character'\] normalize by zscore"):
        RewardAggregator(zscored(character=1.0))
    with pytest.raises(ConfigError, match=r"lack \['visual_motion'\]"):
        RewardAggregator(zscored(character=1.0, visual_motion=1.0), stats)
    RewardAggregator({**zscored(character=1.0), "visual_motion": DimensionConfig(weight=0.0, normalize=NormalizeConfig(
        kind="zscore"))}, stats)  # a zero-weight dimension needs none
    loaded = RewardStatistics.load(stats.save(str(tmp_path / "s.json")))
    assert loaded == stats
    (tmp_path / "bad.json").write_text('{"dimensions": {"character": {"mean": NaN, "std": 1, "count": 2}}}')
    with pytest.raises(ConfigError, match="bad.json: non-finite mean, or no spread .* for \\['character'\\]"):
        RewardStatistics.load(str(tmp_path / "bad.json"))
    for std in ("0", "1.1e-16"):  # equal scores: their float std is often rounding, not 0
        (tmp_path / "flat.json").write_text('{"dimensions": {"character": {"mean": 0.7, "std": %s, "count": 9}}}' % std)
        with pytest.raises(ConfigError, match="flat.json: non-finite mean, or no spread .* for \\['character'\\]"):
            RewardStatistics.load(str(tmp_path / "flat.json"))
    for value in (0.7, 0.1, 0.95):  # seven equal scores whose mean is not exact in binary: std ~1e-16, refused
        with pytest.raises(ConfigError, match="all 7 scores in constant equal"):
            RewardStatistics.from_raw([{"character": value}] * 7, ["character"], "constant")
    assert RewardStatistics.from_raw([{"character": 0.7}, {"character": 0.70001}], ["character"], "close").dimensions[
        "character"].std == pytest.approx(5e-6)  # a small spread is a spread
    with pytest.raises(ConfigError, match="need at least 2"):
        RewardStatistics.from_raw([{"character": 1.0}], ["character"], "one clip")


def test_calibration_counts_only_candidates_that_get_a_reward_and_refuses_a_constant_dimension():
    from anisora_ray.reward.aggregate import calibrate

    dims = {**zscored(character=1.0), **dims_fixed()}
    rows = [{"character": 0.0, "visual_motion": 1.0}, {"character": 2.0, "visual_motion": 2.0},
            {"character": 100.0, "visual_motion": float("nan")}]  # quarantined for its motion score
    stats = calibrate(rows, dims, "scored candidates")
    assert stats.dimensions["character"] == Moments(1.0, 1.0, 2) and stats.source == "2 scored candidates"
    assert RewardAggregator(dims, stats)(rows).reasons[2] == "visual_motion: non-finite score nan"
    flat = [{"character": 0.25, "visual_motion": float(m)} for m in range(5)]
    with pytest.raises(ConfigError, match=r"'character': all 5 scores in 5 scored candidates equal 0.25, so there is "
                                          r"no spread"):
        calibrate(flat, dims, "scored candidates")


def test_zscore_rewards_do_not_depend_on_arrival_order_and_show_a_better_generator():
    rng = np.random.default_rng(0)
    base = [{"character": float(v), "visual_motion": float(m)} for v, m in zip(rng.normal(0.3, 0.05, 40),
                                                                                 rng.uniform(0, 10, 40), strict=True)]
    dims = {**zscored(character=1.0), **dims_fixed()}
    stats = RewardStatistics.from_raw(base, ["character"], "round 0")
    groups = [base[i : i + 4] for i in range(0, 40, 4)]
    order = rng.permutation(len(groups))
    first = [RewardAggregator(dims, stats)(g).rewards for g in groups]  # one aggregator per stream, prompt by prompt
    agg = RewardAggregator(dims, stats)
    shuffled = {int(i): agg(groups[i]).rewards for i in order}
    assert [shuffled[i] for i in range(len(groups))] == first
    stats_again = RewardStatistics.from_raw([base[i] for i in rng.permutation(40)], ["character"], "round 0")
    assert stats_again.dimensions["character"].mean == pytest.approx(stats.dimensions["character"].mean, abs=1e-15)
    better = [{**r, "character": r["character"] + 0.03} for r in base]  # a generator that keeps characters better
    held_out = lambda rows, s: np.mean([n["character"] for n in RewardAggregator(dims, s)(rows).normalized])  # noqa: E731
    assert held_out(better, stats) > held_out(base, stats) + 0.1  # frozen at round 0: the gain shows
    fresh = RewardStatistics.from_raw(better, ["character"], "its own round")
    assert held_out(better, fresh) == pytest.approx(held_out(base, stats), abs=0.02)  # re-fitted: it could not


def dims_fixed():
    return {"visual_motion": DimensionConfig(weight=1.0, normalize=NormalizeConfig(low=0, high=10))}


def test_reward_config_defaults_and_validation():
    cfg = load_config(LOCAL_CONFIG, ["reward.dimensions.visual_motion.weight=2"])
    dimensions = cfg.reward.dimensions.as_dict()
    assert tuple(dimensions) == DIMENSIONS
    assert dimensions["visual_motion"].weight == 2 and dimensions["character"].weight == 1  # overrides merge
    assert dimensions["visual_motion"].normalize.high == 0.05
    with pytest.raises(ConfigError, match="reward.dimensions.sparkle = .*unknown key"):
        load_config(LOCAL_CONFIG, ["reward.dimensions.sparkle.weight=1"])
    with pytest.raises(ConfigError, match="high .* must be > normalize.low"):
        load_config(LOCAL_CONFIG, ["reward.dimensions.visual_motion.normalize.low=2",
                                   "reward.dimensions.visual_motion.normalize.high=1"])
    with pytest.raises(ConfigError, match="needs a weight above 0"):
        load_config(LOCAL_CONFIG, [f"reward.dimensions.{name}.weight=0" for name in DIMENSIONS])


def test_a_calibration_too_small_because_clips_could_not_be_read_names_the_clips(make_config, tmp_path):
    """``score_candidates`` with a z-scored dimension and no statistics calibrates on the set it scores: when too
    few clips decode, the error names the unreadable clips and why, not only "score more candidates"."""
    from anisora_ray.reward.stage import score_candidates
    from anisora_ray.types import Candidate

    cfg = make_config("reward.dimensions.visual_motion.normalize.kind=zscore")
    candidates = []
    for i in range(3):
        (tmp_path / f"v{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
        candidates.append(Candidate(f"p{i}", "a prompt", str(tmp_path / "image.png"), i, 0, str(tmp_path / f"v{i}.mp4"),
                                    0, 9, 64, 64, 8, "", "r", 1.0, 0.1))
    # no clip decodes, so no reward actor is ever called: none is started
    with pytest.raises(ConfigError, match=r"need at least 2 .*; 3 of 3 candidate\(s\) could not be scored: .*v0.mp4: "
                                          r"VideoDecodeError"):
        score_candidates(cfg, candidates, actors=None, progress=False)


def test_a_rank_normalized_dimension_is_said_to_add_nothing_to_held_out_gains(make_config, tmp_path, caplog):
    """Ranked among one version's own candidates, a dimension averages 0.5 in every version: the held-out evaluation
    says so when it loads its prompts (align, eval, ablate), and says nothing without one."""
    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.eval.heldout import heldout_items, rank_caveat

    assert rank_caveat(make_config()) is None
    cfg = make_config("reward.dimensions.visual_motion.normalize.kind=rank")
    assert "['visual_motion'] normalize by rank" in rank_caveat(cfg)
    train = make_demo_set(str(tmp_path / "train"), num_prompts=2, image_size=32, seed=5, prefix="train")
    with caplog.at_level("WARNING", logger="anisora_ray.eval.heldout"):
        heldout_items(cfg, train)
    assert [r.getMessage() for r in caplog.records if r.name == "anisora_ray.eval.heldout"] == [rank_caveat(cfg)]


def test_a_numpy_score_is_a_score_and_what_is_not_a_number_is_said_so():
    import numpy as np

    from anisora_ray.reward.aggregate import invalid_reason

    assert invalid_reason({"visual_motion": np.float32(0.95), "character": np.int64(1)}, ["visual_motion", "character"]) \
        is None  # was "non-finite score np.float32(0.95)": a backend's numpy scalar quarantined a valid clip
    assert invalid_reason({"visual_motion": "0.5", "character": np.float64("inf")}, ["visual_motion", "character"]) \
        == "visual_motion: not a number: '0.5'; character: non-finite score np.float64(inf)"
