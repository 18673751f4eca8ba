"""VideoScore (TIGER-Lab/VideoScore-v1.1) as a reward backend and an evaluation metric: a tiny random-init folder
in the released layout loads through the real ``from_pretrained`` path and scores as the released inference code
does (prompt, 48-frame sampling, last-token logits rounded to 3 digits), checked by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from anisora_ray.errors import ConfigError
from anisora_ray.reward.base import ClipBatch, build_dimension
from anisora_ray.reward.videoscore import (
    ASPECTS,
    DIMENSION_ASPECT,
    REGRESSION_QUERY_PROMPT,
    VideoScoreModel,
    frame_indices,
    local_checkpoint,
    query_prompt,
    videoscore_scores,
)

# examples/run_videoscore.py of github.com/TIGER-AI-Lab/VideoScore, as released (note the space after "sub-score,")
RELEASED_PROMPT = """
Suppose you are an expert in judging and evaluating the quality of AI-generated videos,
please watch the following frames of a given video and see the text prompt for generating the video,
then give scores from 5 different dimensions:
(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color
(2) temporal consistency, both the consistency of objects or humans and the smoothness of motion or movements
(3) dynamic degree, the degree of dynamic changes
(4) text-to-video alignment, the alignment between the text prompt and the video content
(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge

for each dimension, output a float number from 1.0 to 4.0,
the higher the number is, the better the video performs in that sub-score,\x20
the lowest 1.0 means Bad, the highest 4.0 means Perfect/Real (the video is like a real video)
Here is an output example:
visual quality: 3.2
temporal consistency: 2.7
dynamic degree: 4.0
text-to-video alignment: 2.3
factual consistency: 1.8

For this video, the text prompt is "{text_prompt}",
all the frames of video are as follows:
"""
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is ~30x faster than two on a busy 2-core machine (and DimensionScorer sets it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny(cache) -> str:
    return local_checkpoint("tiny:videoscore", cache_dir=cache)


@pytest.fixture(scope="module")
def model(tiny) -> VideoScoreModel:
    return VideoScoreModel(tiny, device="cpu", dtype="float32")


def clips(*lengths: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (n, 40, 48, 3), dtype=np.uint8) for n in lengths]


def batch(videos, prompts) -> ClipBatch:
    return ClipBatch(frames=videos, prompts=prompts, images=[v[0] if len(v) else np.zeros((4, 4, 3), np.uint8)
                                                             for v in videos], references=[None] * len(videos))


def test_prompt_is_the_released_template():
    assert REGRESSION_QUERY_PROMPT == RELEASED_PROMPT
    assert query_prompt("a cat {x}", 3) == RELEASED_PROMPT.format(text_prompt="a cat {x}") + "<image> <image> <image> "


def test_frames_are_sampled_as_released(model):
    """48 of the whole clip at np.arange(0, L, L / 48), floored; a clip of 48 or fewer frames whole."""
    for total in (49, 60, 144, 1000):
        got = frame_indices(total)
        np.testing.assert_array_equal(got, np.arange(0, total, total / 48).astype(int))
        assert len(got) == 48 and got[0] == 0 and len(set(got)) == 48
    np.testing.assert_array_equal(frame_indices(30), np.arange(30))
    np.testing.assert_array_equal(frame_indices(48), np.arange(48))
    np.testing.assert_array_equal(frame_indices(144, 16), np.arange(0, 144, 9))
    # the frames that reach the processor: frame i is a flat grey of level 4 * i
    clip = (np.arange(60, dtype=np.uint8)[:, None, None, None] * 4).repeat(40, 1).repeat(48, 2).repeat(3, 3)
    inputs = model.inputs(clip, "a girl")
    pixels = inputs["pixel_values"][0]  # [frames, 3, H, W], (x / 255 - 0.5) / 0.5
    levels = torch.round((pixels.mean(dim=(1, 2, 3)) * 0.5 + 0.5) * 255 / 4).long().numpy()
    np.testing.assert_array_equal(levels, np.arange(0, 60, 60 / 48).astype(int))
    assert int((inputs["input_ids"] == model.model.config.image_token_id).sum()) == 4 * 48  # image_seq_len 4


def test_five_aspects_score_as_released_by_hand(model, tiny):
    """The released math: processor(prompt + "<image> " per frame, frames), the model's hidden state at the last
    token through the ``score`` head, each of the five logits round(., 3)."""
    from PIL import Image
    from transformers import AutoProcessor

    from anisora_ray.reward.released.idefics2 import load_regression

    videos, prompts = clips(5, 60, 9), ["a girl with red hair runs", "the cat jumps", "a girl with red hair runs"]
    got = videoscore_scores(videos, prompts, model)
    assert list(got) == [*ASPECTS, "mean"]
    reference = load_regression(tiny, torch.float32)
    processor = AutoProcessor.from_pretrained(tiny, backend="pil")
    for i, (frames, caption) in enumerate(zip(videos, prompts, strict=True)):
        frames = frames[np.arange(0, len(frames), len(frames) / 48).astype(int)] if len(frames) > 48 else frames
        inputs = processor(text=RELEASED_PROMPT.format(text_prompt=caption) + "<image> " * len(frames),
                           images=[Image.fromarray(f) for f in frames], return_tensors="pt")
        assert not (inputs["input_ids"] == reference.config.text_config.pad_token_id).any()  # no pad: the last token
        with torch.no_grad():
            hidden = reference.model(**inputs).last_hidden_state[0, -1]
            logits = reference.score(hidden)
        expected = [round(float(v), 3) for v in logits]
        assert [got[a][i] for a in ASPECTS] == pytest.approx(expected, abs=1e-9)
        assert got["mean"][i] == pytest.approx(np.mean(expected), abs=1e-12)
    assert all(abs(got[a][0] - got[a][1]) > 1e-3 for a in ASPECTS)  # the clips differ
    assert all(abs(got[a][0] - got[a][2]) > 1e-3 for a in ASPECTS)  # so do the frames, same caption
    recaptioned = videoscore_scores(videos[:1], ["the cat jumps over a long sword"], model)
    assert any(abs(recaptioned[a][0] - got[a][0]) > 1e-3 for a in ASPECTS)  # the caption matters


def test_a_clip_that_cannot_be_scored_is_nan_and_leaves_the_others_alone(model):
    videos = clips(6, 0, 7)
    scores = model.scores(videos, ["a girl", "a girl", "the cat"])
    assert scores.shape == (3, 5) and np.isnan(scores[1]).all() and np.isfinite(scores[[0, 2]]).all()
    np.testing.assert_array_equal(scores[[0, 2]], model.scores([videos[0], videos[2]], ["a girl", "the cat"]))
    no_pixels = np.zeros((3, 0, 8, 3), np.uint8)
    assert np.isnan(videoscore_scores([no_pixels], ["a girl"], model)["mean"]).all()


def test_the_videoscore_backend_reads_each_dimensions_aspect(model, tiny):
    videos, prompts = clips(5, 60), ["a girl with red hair runs", "the cat jumps"]
    expected = model.scores(videos, prompts)
    for dimension, aspect in DIMENSION_ASPECT.items():
        scorer = build_dimension(dimension, "videoscore", checkpoint=tiny, device="cpu", dtype="float32")
        assert scorer.name == dimension and scorer.aspect == aspect
        np.testing.assert_array_equal(scorer.score(batch(videos, prompts)), expected[:, ASPECTS.index(aspect)])
    other = build_dimension("text_video", "videoscore", checkpoint=tiny, device="cpu", dtype="float32",
                            aspect="visual_quality", num_frames=2)
    few = VideoScoreModel(tiny, device="cpu", dtype="float32", num_frames=2).scores(videos, prompts)
    np.testing.assert_array_equal(other.score(batch(videos, prompts)), few[:, 0])
    assert not np.allclose(few[:, 0], expected[:, 0])  # 2 frames, not 48
    assert np.isnan(other.score(batch([clips(3)[0][:0]], ["a girl"]))).all()
    with pytest.raises(ConfigError, match=r"aspect = 'quality'.*visual_quality"):
        build_dimension("visual_appeal", "videoscore", checkpoint=tiny, aspect="quality")
    with pytest.raises(ConfigError, match="num_frames = 0"):
        build_dimension("visual_appeal", "videoscore", checkpoint=tiny, num_frames=0)
    with pytest.raises(ConfigError, match="unknown option"):
        build_dimension("visual_appeal", "videoscore", checkpoint=tiny, frames=8)
    with pytest.raises(ConfigError, match="no such backend"):
        build_dimension("character", "videoscore")
    with pytest.raises(ConfigError, match="no such folder"):
        build_dimension("visual_appeal", "videoscore", checkpoint="/no/such/videoscore")


def test_the_tiny_folder_has_the_released_layout(tiny, cache):
    files = set(os.listdir(tiny))
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json",
            "tokenizer.json", "tokenizer_config.json"} <= files

    def read(name: str) -> dict:
        with open(os.path.join(tiny, name)) as f:
            return json.load(f)

    config = read("config.json")
    assert config["architectures"] == ["Idefics2ForSequenceClassification"] and config["problem_type"] == "regression"
    assert len(config["id2label"]) == 5 and config["model_type"] == "idefics2"
    assert read("processor_config.json") == {"image_seq_len": 4, "processor_class": "Idefics2Processor"}
    images = read("preprocessor_config.json")
    assert images["do_image_splitting"] is False and images["resample"] == 2 and images["image_mean"] == [0.5] * 3
    from safetensors import safe_open

    with safe_open(os.path.join(tiny, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"score.weight", "score.bias"} <= keys and all(k.startswith(("model.", "score.")) for k in keys)
    assert local_checkpoint("tiny:videoscore", cache_dir=cache) == tiny  # built once, cached
    with pytest.raises(ValueError, match="random-base:videoscore"):
        local_checkpoint("random-base:videoscore", cache_dir=cache)


def test_the_preset_loads_passes_the_driver_checks_and_scores_with_tiny_weights(cache, tmp_path):
    from anisora_ray.config import load_config
    from anisora_ray.models.tiny_reward import resolve_backbones
    from anisora_ray.reward.actors import DimensionScorer
    from anisora_ray.reward.base import check_reward_options

    preset = os.path.abspath(os.path.join(CONFIGS, "reward", "videoscore.yaml"))
    cfg = load_config(preset)
    dims = cfg.reward.dimensions.as_dict()
    check_reward_options(cfg.reward)  # no weights loaded: names, option keys and values only
    assert {n for n, d in dims.items() if d.weight > 0} == set(DIMENSION_ASPECT) and dims["character"].weight == 0
    for name in DIMENSION_ASPECT:
        d = dims[name]
        assert d.backend == "videoscore" and d.options["checkpoint"] == "TIGER-Lab/VideoScore-v1.1"
        assert (d.normalize.kind, d.normalize.low, d.normalize.high) == ("fixed", 1.0, 4.0)
        assert d.actor.num_gpus == 1 and d.options["dtype"] == "bfloat16"
    assert cfg.video.sample_frames == 48
    # A config including it, pointed at the tiny weights on CPU (what an actor builds after the driver resolved them)
    (tmp_path / "tiny.yaml").write_text(f"include: {preset}\nreward:\n  dimensions:\n" + "".join(
        f"    {n}: {{options: {{checkpoint: 'tiny:videoscore', cache_dir: '{cache}', device: cpu, dtype: float32}}}}\n"
        for n in DIMENSION_ASPECT))
    cfg = load_config(tmp_path / "tiny.yaml", ["reward.dimensions.visual_motion.options.aspect=visual_quality"])
    check_reward_options(cfg.reward)
    videos, prompts = clips(5, 50), ["a girl with red hair runs", "the cat jumps"]
    appeal = motion = None
    for name in ("visual_appeal", "visual_motion"):
        dim = cfg.reward.dimensions.as_dict()[name]
        dim = dim.model_copy(update={"options": resolve_backbones(dim.options)})
        assert os.path.isdir(dim.options["checkpoint"])
        scores = DimensionScorer(name, dim).score(batch(videos, prompts))
        assert scores.shape == (2,) and np.isfinite(scores).all()
        appeal, motion = (scores, motion) if name == "visual_appeal" else (appeal, scores)
    np.testing.assert_array_equal(appeal, motion)  # the same aspect (visual_quality) of the same weights
    bad = load_config(tmp_path / "tiny.yaml", ["reward.dimensions.image_video.options.aspect=character"])
    with pytest.raises(ConfigError, match=r"reward.dimensions.image_video.options.aspect = 'character'"):
        check_reward_options(bad.reward)


def test_eval_computes_videoscore_again_when_the_model_or_its_settings_change(tiny, cache, tmp_path):
    """``videoscore.parquet`` is read back only when it was computed with this checkpoint, frame count and dtype
    (``videoscore.forms.json``): another model's scores are not paired with this one's."""
    import json
    import os

    import pyarrow as pa

    from anisora_ray.config.sections import VideoScoreEvalConfig
    from anisora_ray.eval.videoscore_eval import FILE, FORMS_FILE, ensure_videoscore
    from anisora_ray.io import fs

    rows = [{"prompt_id": "p0", "seed": 0, "video_uri": "gone.mp4", "prompt": "a cat", "quarantine_reason": "unreadable"}]
    fs.write_table(pa.Table.from_pylist(rows), str(tmp_path / "scores.parquet"))  # nothing to score: no Ray needed
    cfg = VideoScoreEvalConfig(checkpoint="tiny:videoscore", cache_dir=cache, dtype="float32")
    ensure_videoscore(str(tmp_path), cfg)
    made = os.stat(tmp_path / FILE).st_mtime_ns
    assert json.loads((tmp_path / FORMS_FILE).read_text())["checkpoint"] == "tiny:videoscore"
    ensure_videoscore(str(tmp_path), cfg)
    assert os.stat(tmp_path / FILE).st_mtime_ns == made  # the same model and settings: read back
    ensure_videoscore(str(tmp_path), cfg.model_copy(update={"num_frames": 4}))
    assert os.stat(tmp_path / FILE).st_mtime_ns != made and json.loads((tmp_path / FORMS_FILE).read_text())["num_frames"] == 4
    again = os.stat(tmp_path / FILE).st_mtime_ns
    (tmp_path / FORMS_FILE).unlink()  # a file from before the record: computed again
    ensure_videoscore(str(tmp_path), cfg.model_copy(update={"num_frames": 4}))
    assert os.stat(tmp_path / FILE).st_mtime_ns != again
