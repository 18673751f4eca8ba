import math

import numpy as np
import pytest

from anisora_ray.config import DimensionConfig, NormalizeConfig, load_config
from anisora_ray.errors import ConfigError
from anisora_ray.types import DIMENSIONS
from anisora_ray.reward.aggregate import RewardAggregator, RunningMoments, normalize
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


def test_zscore_uses_running_moments_across_batches():
    moments = RunningMoments()
    cfg = NormalizeConfig(kind="zscore")
    first = normalize(np.array([0.0, 2.0]), cfg, moments)
    assert first == pytest.approx([1 / (1 + math.e), 1 - 1 / (1 + math.e)])
    normalize(np.array([10.0, 12.0]), cfg, moments)
    values = np.array([0.0, 2.0, 10.0, 12.0])
    assert moments.count == 4 and moments.mean == pytest.approx(values.mean()) and moments.std == pytest.approx(values.std())


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
