"""Classical reward backends on synthetic clips with known properties."""

import cv2
import numpy as np
import pytest

from anisora_ray.errors import ConfigError
from anisora_ray.reward import DIMENSIONS, ClipBatch, build_dimension

SIZE = 64
PINK, BLUE = (246, 143, 181), (104, 160, 237)


def background(seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 40, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    return (cv2.resize(noise, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC) + 90).astype(np.uint8)


def scene(x, y, colour=PINK, bg=None):
    frame = (background() if bg is None else bg).copy()
    cv2.rectangle(frame, (int(x), int(y)), (int(x) + 18, int(y) + 22), colour, -1)
    cv2.circle(frame, (int(x) + 6, int(y) + 8), 2, (20, 20, 20), -1)
    cv2.circle(frame, (int(x) + 12, int(y) + 8), 2, (20, 20, 20), -1)
    return frame


def clip_of(positions, colours=None):
    colours = colours or [PINK] * len(positions)
    return np.stack([scene(x, y, c) for (x, y), c in zip(positions, colours)])


def batch(clips, prompt="an anime pink cat waves", image=None):
    image = clips[0][0] if image is None else image
    return ClipBatch(frames=list(clips), prompts=[prompt] * len(clips), images=[image] * len(clips),
                     references=[None] * len(clips))


def scores(dimension, clips, **kw):
    return build_dimension(dimension, "classical").score(batch(clips, **kw))


STATIC = clip_of([(20, 20)] * 12)
PAN = clip_of([(6 + 3 * t, 20) for t in range(12)])
JITTER = clip_of([(6 + 3 * t + (9 if t % 2 else -9), 20 + (6 if t % 3 == 0 else -6)) for t in range(12)])


def test_every_dimension_has_a_classical_backend():
    for name in DIMENSIONS:
        out = scores(name, [STATIC, PAN])
        assert out.shape == (2,) and np.isfinite(out).all(), name


def test_static_clip_moves_less_than_moving_one():
    static, moving = scores("visual_motion", [STATIC, PAN])
    assert static < 0.2 * moving and moving > 0


def test_jittered_pan_is_less_smooth_than_smooth_pan():
    smooth, jitter = scores("visual_smoothness", [PAN, JITTER])
    assert jitter < smooth


def test_blurred_clip_is_less_appealing():
    blurred = np.stack([cv2.GaussianBlur(f, (9, 9), 3) for f in PAN])
    sharp, blur = scores("visual_appeal", [PAN, blurred])
    assert blur < sharp


def test_clip_drifting_from_the_input_image_is_less_consistent():
    drift = np.stack([np.roll(f, 3 * t, axis=0) for t, f in enumerate(STATIC)])
    stay, away = scores("image_video", [STATIC, drift], image=STATIC[0])
    assert away < stay


def test_character_changing_colour_loses_identity():
    changed = clip_of([(20, 20)] * 12, [PINK] * 2 + [BLUE] * 10)
    same, other = scores("character", [STATIC, changed], image=STATIC[0])
    assert other < same


def test_text_video_stand_in_follows_colour_words():
    blue_cat = clip_of([(20, 20)] * 12, [BLUE] * 12)
    pink, blue = scores("text_video", [STATIC, blue_cat], prompt="an anime pink cat waves")
    assert pink > blue
    neutral = scores("text_video", [STATIC, blue_cat], prompt="a cat waves")
    assert list(neutral) == [0.5, 0.5]


def test_text_video_stand_in_counts_what_a_person_would_call_the_colour_and_does_not_saturate():
    salmon = clip_of([(20, 20)] * 12, [(245, 160, 110)] * 12)  # within 60 of pink's anchor, but nearest orange
    half = clip_of([(20, 20)] * 12, [PINK] * 6 + [BLUE] * 6)  # the pink fades out half-way
    painted = np.stack([np.full_like(STATIC[0], PINK)] * 12)  # the whole frame pink: more than the image shows
    faithful, off_shade, fading, more = scores("text_video", [STATIC, salmon, half, painted])
    assert faithful == pytest.approx(1.0) and off_shade < 0.05  # the off shade is orange, not pink
    assert 0.4 < fading < 0.6  # graded by how much of the image's pink the clip keeps, not capped at 5%
    assert more == faithful  # painting more of the named colour earns nothing


def test_too_short_clip_is_nan_not_zero():
    out = scores("visual_smoothness", [PAN[:2], PAN])
    assert np.isnan(out[0]) and np.isfinite(out[1])


def test_unknown_backend_and_bad_batch_are_named():
    with pytest.raises(ConfigError, match="reward.dimensions.visual_motion.backend = 'magic': no such backend"):
        build_dimension("visual_motion", "magic")
    with pytest.raises(ValueError, match=r"clip 0: expected uint8 \[N, H, W, 3\]"):
        ClipBatch([PAN.astype(np.float32)], ["p"], [PAN[0]], [None])
    with pytest.raises(ValueError, match="disagree in length"):
        ClipBatch([PAN], ["p", "q"], [PAN[0]], [None])


def test_a_dimension_scores_at_most_its_batch_size_clips_a_call_wherever_its_batch_comes_from():
    """``reward.dimensions.<d>.batch_size`` caps what the backend sees (a GPU model's memory), whether the batch came
    from the pairs pipeline, already cut to it, or from the persistent actors and ``score``, at ``reward.batch_size``."""
    from anisora_ray.config import DimensionConfig
    from anisora_ray.reward.actors import DimensionScorer

    clips = [STATIC, PAN, JITTER, PAN[::-1], STATIC, JITTER[::-1], PAN[:2]]
    whole = DimensionScorer("visual_motion", DimensionConfig()).score(batch(clips))
    scorer = DimensionScorer("visual_motion", DimensionConfig(batch_size=3))
    seen, score = [], scorer.dimension.score
    scorer.dimension.score = lambda b: seen.append(len(b)) or score(b)
    np.testing.assert_array_equal(scorer.score(batch(clips)), whole)
    assert seen == [3, 3, 1]
    part = batch(clips).part(1, 3)
    assert [p.shape for p in part.frames] == [PAN.shape, JITTER.shape] and len(part.character_ids) == 2


def test_clips_of_different_sizes_in_one_batch_reach_the_backend_one_size_a_call():
    """``video.sample_size: null`` keeps each clip's size, so one batch can mix them; a backend that stacks frames
    (the learned ones) would fail on the whole batch. Each call gets clips of one size; scores come back in order."""
    import cv2

    from anisora_ray.config import DimensionConfig
    from anisora_ray.reward.actors import DimensionScorer

    def bigger(clip):
        return np.stack([cv2.resize(f, (f.shape[1] * 2, f.shape[0] * 2), interpolation=cv2.INTER_NEAREST) for f in clip])

    clips = [STATIC, bigger(PAN), JITTER, bigger(STATIC), PAN]
    scorer = DimensionScorer("visual_motion", DimensionConfig(batch_size=2))
    seen, score = [], scorer.dimension.score
    scorer.dimension.score = lambda b: seen.append({tuple(c.shape[1:3]) for c in b.frames}) or score(b)
    got = scorer.score(batch(clips))
    assert all(len(sizes) == 1 for sizes in seen) and len(seen) == 3  # 3 small clips in 2 calls, 2 big ones in 1
    alone = [float(DimensionScorer("visual_motion", DimensionConfig()).score(batch([c]))[0]) for c in clips]
    np.testing.assert_allclose(got, alone)
