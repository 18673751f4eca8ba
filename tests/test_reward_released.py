"""The released AnimeReward scorers: synthetic checkpoints in the released key layout and file formats
(built from the released module definitions at tiny width) convert, load through the scoring path,
and score as the released math does (a plain-torch re-implementation) to 1e-5; a missing or
misshapen key fails naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anisora_ray.reward.base import ClipBatch, build_dimension
from anisora_ray.reward.released import reference as ref
from anisora_ray.reward.released import synthetic
from anisora_ray.reward.released.common import CheckpointError, released_pixels, safe_globals

VIT = synthetic.TINY_VIT


def clips(n: int = 2, frames: int = 5, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (frames, size, size + 8, 3), dtype=np.uint8) for _ in range(n)]


def clip_batch(videos, prompts=None, character_ids=None) -> ClipBatch:
    n = len(videos)
    return ClipBatch(frames=videos, prompts=prompts or ["a girl with red hair runs"] * n, images=[v[0] for v in videos],
                     references=[None] * n, character_ids=character_ids)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert-base-uncased")
    (path / "vocab.txt").write_text("\n".join(synthetic.BERT_WORDS) + "\n")
    return str(path)


def synthetic_consistency(tmp_path, text: bool, seed: int = 0):
    model = synthetic.consistency(text, seed)
    return model, ref.save_released(model, str(tmp_path / ("tvc.pth" if text else "ivc.pth")))


def test_image_video_converts_and_scores_as_released(tmp_path):
    from anisora_ray.reward.released.blip import convert_consistency

    model, path = synthetic_consistency(tmp_path, text=False)
    out = convert_consistency(path, str(tmp_path / "ivc"), text=False)
    scorer = build_dimension("image_video", "released", checkpoint=out, device="cpu")
    videos = clips()
    got = scorer.score(clip_batch(videos))
    expected = [float(model.score(released_pixels(v, 32, "cpu"), key_image=released_pixels(v[:1], 32, "cpu")))
                for v in videos]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert ((got > 0) & (got < 1)).all() and abs(got[0] - got[1]) > 1e-4


def test_text_video_converts_with_blip_tokenizer_and_scores_as_released(tmp_path, bert_dir):
    from transformers import BertTokenizer

    from anisora_ray.reward.released.blip import convert_consistency

    model, path = synthetic_consistency(tmp_path, text=True)
    out = convert_consistency(path, str(tmp_path / "tvc"), text=True, tokenizer=bert_dir)
    scorer = build_dimension("text_video", "released", checkpoint=out, device="cpu")
    videos = clips()
    prompts = ["a girl with red hair runs", "the cat jumps over the long sword " * 6]  # the second is cut at 30 tokens
    got = scorer.score(clip_batch(videos, prompts))
    tok = BertTokenizer(f"{bert_dir}/vocab.txt")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    expected = []
    for v, p in zip(videos, prompts, strict=True):
        t = tok(p, padding="max_length", truncation=True, max_length=30, return_tensors="pt")
        expected.append(float(model.score(released_pixels(v, 32, "cpu"), ids=t["input_ids"], mask=t["attention_mask"])))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    swapped = scorer.score(clip_batch(videos, prompts[::-1]))
    assert not np.allclose(swapped, got, atol=1e-5)  # the caption matters


def test_a_missing_or_misshapen_key_fails_naming_it(tmp_path):
    from anisora_ray.reward.released.blip import convert_consistency

    model, path = synthetic_consistency(tmp_path, text=False)
    payload = torch.load(path, weights_only=True)
    del payload["model"]["visual_encoder.blocks.1.attn.proj.weight"]
    torch.save(payload, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['vision.encoder.layers.1.self_attn.projection.weight'\]"):
        convert_consistency(str(tmp_path / "missing.pth"), str(tmp_path / "m"), text=False)
    payload = torch.load(path, weights_only=True)
    payload["model"]["head_diff.weight"] = torch.zeros(1, 40)
    torch.save(payload, tmp_path / "misshapen.pth")
    with pytest.raises(CheckpointError, match=r"misshapen \['head_diff.weight: \(1, 40\) vs \(1, 48\)'\]"):
        convert_consistency(str(tmp_path / "misshapen.pth"), str(tmp_path / "s"), text=False)
    torch.save({"model": model.state_dict(), "opt": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a module
    with pytest.raises(CheckpointError, match="pickled.pth cannot be loaded with weights_only=True"):
        convert_consistency(str(tmp_path / "pickled.pth"), str(tmp_path / "p"), text=False)
    with pytest.raises(CheckpointError, match="not a converted reward folder"):
        build_dimension("image_video", "released", checkpoint=str(tmp_path / "nowhere"), device="cpu")


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return synthetic.clip_tokenizer(str(tmp_path_factory.mktemp("clip-tokenizer")))


def test_motion_converts_from_mmengine_and_scores_as_released(tmp_path, clip_tokenizer):
    from transformers import AutoTokenizer

    from anisora_ray.reward.released.actionclip import convert_actionclip

    model = synthetic.actionclip()
    path = ref.save_released(model, str(tmp_path / "testvl.pth"), container="mmengine")
    out = convert_actionclip(path, str(tmp_path / "motion"), tokenizer=clip_tokenizer)
    prompts = ["running, jumping, dancing", "remain stationary"]  # short: this tokenizer spends a token per character
    scorer = build_dimension("visual_motion", "released", checkpoint=out, device="cpu", prompts=prompts)
    videos = clips(3, frames=24) + clips(1, frames=5, seed=1)  # 24 sampled frames, and a short clip (repeats)
    got = scorer.score(clip_batch(videos))
    tok = AutoTokenizer.from_pretrained(clip_tokenizer)
    ids = torch.tensor([tok(p, padding="max_length", max_length=77)["input_ids"] for p in prompts])
    ids[ids == tok.pad_token_id] = 0  # OpenAI's clip.tokenize pads with 0 after <|endoftext|>
    ids[torch.arange(2), [len(tok(p)["input_ids"]) - 1 for p in prompts]] = tok.eos_token_id
    expected = [float(model.score(released_pixels(v, 32, "cpu"), ids)) for v in videos]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert ((got > 0) & (got < 1)).all() and np.ptp(got) > 1e-4
    with torch.serialization.safe_globals(safe_globals()):  # the numpy values in mmengine's meta
        payload = torch.load(path, weights_only=True)
    payload["state_dict"]["adapter.transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(3 * 48, 40)
    torch.save(payload, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"adapter.1.self_attn.q_proj.weight: \(48, 40\) vs \(48, 48\)"):
        convert_actionclip(str(tmp_path / "bad.pth"), str(tmp_path / "bad"), tokenizer=clip_tokenizer)


def test_character_recognizer_and_gallery_convert_and_score_each_clip_against_its_own_character(tmp_path):
    from PIL import Image

    from anisora_ray.reward.released.character import convert_character, square_crop

    model = synthetic.retrieval()
    path = ref.save_released(model, str(tmp_path / "animate_recoginzer.pth"))
    detector = dict(detector="tiny:grounding-dino", segmenter="tiny:sam", box_threshold=0.0, text_threshold=0.0,
                    cache_dir=str(tmp_path / "backbones"), device="cpu")
    rng = np.random.default_rng(3)
    frames = {c: rng.integers(0, 256, (40, 48, 3), dtype=np.uint8) for c in ("alice", "bob", "carol")}
    # The gallery holds masked crops, as the released one does: made here with a throwaway converted folder.
    Image.fromarray(frames["alice"]).save(tmp_path / "seed.png")
    entries = [{"image": "seed.png", "caption": "x"}, {"image": "seed.png", "caption": "y"}]
    (tmp_path / "seed.json").write_text(json.dumps(entries))
    seed = build_dimension("character", "released", checkpoint=convert_character(
        path, str(tmp_path / "seed.json"), str(tmp_path), str(tmp_path / "seed")), **detector)
    for c, frame in frames.items():
        ((box, mask),) = seed.detect.regions(frame[None])
        Image.fromarray(square_crop(frame, box, mask)).save(tmp_path / f"{c}.png")
    entries = [{"image": "alice.png", "caption": "Alice"}, {"image": "alice.png", "caption": "alice"},
               {"image": "bob.png", "caption": "Bob"}, {"image": "carol.png", "caption": "Carol"}]
    (tmp_path / "gallerys.json").write_text(json.dumps(entries))
    out = convert_character(path, str(tmp_path / "gallerys.json"), str(tmp_path), str(tmp_path / "character"))
    scorer = build_dimension("character", "released", checkpoint=out, identity="own", **detector)
    assert scorer.names == ["alice", "alice", "bob", "carol"]  # lower-cased, as released

    # Parity with the released math on the same crops: top-1 identity probability
    clip = np.stack([frames["alice"]] * 6)
    pixels = scorer.crop_pixels(clip, 8)
    assert pixels.shape == (6, 3, 32, 32)
    gallery = model.embed(released_pixels([np.asarray(Image.open(tmp_path / e["image"])) for e in entries], 32, "cpu"))
    expected = model.score(pixels[None], gallery, [e["caption"].lower() for e in entries])
    probs, names = scorer.probabilities(pixels)
    assert names == ["alice", "bob", "carol"]
    np.testing.assert_allclose(float(probs.max()), float(expected[0]), atol=1e-5)
    top1 = build_dimension("character", "released", checkpoint=out, **detector)  # the default, as released
    np.testing.assert_allclose(top1.score(clip_batch([clip])), [float(expected[0])], atol=1e-5)

    # Each clip against its own character: the same clip of alice, as prompt alice's and as prompt bob's candidate
    own = scorer.score(clip_batch([clip, clip], character_ids=["Alice", "bob"]))
    assert own[0] == pytest.approx(float(probs[0]), abs=1e-6) and own[0] > own[1]
    # A character with no gallery entry: its first-frame image joins as one more identity
    unknown = scorer.score(ClipBatch(frames=[clip, clip], prompts=["p", "p"], images=[frames["alice"], frames["carol"]],
                                     references=[None, None], character_ids=["dave", None]))
    for score, image in zip(unknown, [frames["alice"], frames["carol"]], strict=True):
        first = scorer.model(scorer.crop_pixels(image[None], 1))[0]
        assert score == pytest.approx(float(scorer.probabilities(pixels, extra=first)[0][-1]), abs=1e-6)
    assert unknown[0] != pytest.approx(unknown[1], abs=1e-4)


def test_character_detects_and_segments_only_the_frames_it_crops(tmp_path):
    """As released, crops come from ``frames[::len // 8][:8]``: those frames, and only those, meet the
    detector and the segmenter (not all 24 sampled frames)."""
    from PIL import Image

    from anisora_ray.reward.released.character import convert_character

    path = ref.save_released(synthetic.retrieval(), str(tmp_path / "animate_recoginzer.pth"))
    rng = np.random.default_rng(5)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "gallerys.json").write_text(json.dumps([{"image": "a.png", "caption": "A"}, {"image": "b.png", "caption": "B"}]))
    out = convert_character(path, str(tmp_path / "gallerys.json"), str(tmp_path), str(tmp_path / "character"))
    scorer = build_dimension("character", "released", checkpoint=out, detector="tiny:grounding-dino", segmenter="tiny:sam",
                             box_threshold=0.0, text_threshold=0.0, cache_dir=str(tmp_path / "backbones"), device="cpu")
    seen = {"boxes": [], "masks": []}

    def recording(stage):  # our own detector's method, wrapped to record the frames it is given
        real = getattr(scorer.detect, stage)

        def record(frames, *args):
            seen[stage].append(np.array(frames))
            return real(frames, *args)

        return record

    for stage in seen:
        setattr(scorer.detect, stage, recording(stage))
    clip = rng.integers(0, 256, (24, 40, 48, 3), dtype=np.uint8)
    pixels = scorer.crop_pixels(clip, 8)
    assert len(pixels) == 8 and len(seen["boxes"]) == len(seen["masks"]) == 1
    np.testing.assert_array_equal(seen["boxes"][0], clip[::3][:8])  # frames 0, 3, ..., 21
    np.testing.assert_array_equal(seen["masks"][0], clip[::3][:8])
    short = clip[:5]
    assert len(scorer.crop_pixels(short, 8)) == 5
    np.testing.assert_array_equal(seen["boxes"][-1], short)  # fewer frames than crops: every frame
    scorer.detect.box_threshold = 1.1  # nothing detected: no crop (and NaN), not a crash
    assert len(scorer.crop_pixels(clip, 8)) == 0 and np.isnan(scorer.score(clip_batch([clip]))[0])


def test_idefics2_image_processor_is_the_pil_one_as_trained(tmp_path):
    """transformers 4.45's slow processor, as the released scorers were trained: PIL bilinear to the configured
    shortest/longest edge, rescale 1/255, mean = std = 0.5 (a frame of odd size, by hand)."""
    from PIL import Image
    from transformers.image_processing_backends import PilBackend

    path = synthetic.idefics2_regression(str(tmp_path / "smooth"))  # shortest_edge 28, longest_edge 56
    scorer = build_dimension("visual_smoothness", "released", checkpoint=path, device="cpu", dtype="float32")
    assert isinstance(scorer.processor.image_processor, PilBackend)
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (2, 37, 61, 3), dtype=np.uint8)
    tall, small = rng.integers(0, 256, (61, 37, 3), dtype=np.uint8), rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)

    def by_hand(frame, h, w):
        x = np.asarray(Image.fromarray(frame).resize((w, h), Image.BILINEAR), np.float32) / 255.0
        return torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)

    got = scorer.inputs(wide, "a girl")["pixel_values"][0]  # the scorer's own path: [frames, 3, H, W]
    assert got.shape == (2, 3, 33, 56)  # 61 -> 56, 37 -> int(56 / (61 / 37)) = 33
    for i in range(2):
        torch.testing.assert_close(got[i], by_hand(wide[i], 33, 56), atol=1e-6, rtol=0)
    images = [Image.fromarray(f) for f in (tall, small)]
    out = scorer.processor.image_processor(images=[images], return_tensors="pt")
    for i, (frame, (h, w)) in enumerate(zip((tall, small), ((56, 33), (28, 28)), strict=True)):  # small: up to 28
        torch.testing.assert_close(out["pixel_values"][0, i, :, :h, :w], by_hand(frame, h, w), atol=1e-6, rtol=0)
        assert int(out["pixel_attention_mask"][0, i].sum()) == h * w


def test_idefics2_regression_loads_from_a_transformers_folder_and_scores_as_released(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor

    from anisora_ray.reward.released.idefics2 import REGRESSION_QUERY_PROMPT, load_regression

    path = synthetic.idefics2_regression(str(tmp_path / "smooth"))
    videos = clips(2, frames=6, size=28)
    prompts = ["a girl with red hair runs", "the cat jumps"]
    scores = {}
    for name in ("visual_smoothness", "visual_appeal"):
        scorer = build_dimension(name, "released", checkpoint=path, device="cpu", dtype="float32")
        scores[name] = scorer.score(clip_batch(videos, prompts))
    np.testing.assert_array_equal(scores["visual_smoothness"], scores["visual_appeal"])  # same model here, same prompt
    # The released math, by hand: the quality prompt + "<image> " per frame, last token's logit, round(., 3) / 100
    model = load_regression(path, torch.float32)
    processor = AutoProcessor.from_pretrained(path, do_image_splitting=False)
    for got, frames, caption in zip(scores["visual_smoothness"], videos, prompts, strict=True):
        text = REGRESSION_QUERY_PROMPT.format(text_prompt=caption) + "<image> " * len(frames)
        inputs = processor(text=text, images=[Image.fromarray(f) for f in frames], return_tensors="pt")
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4 * len(frames)
        with torch.no_grad():
            hidden = model.model(**inputs).last_hidden_state[0, -1]
            logit = float(model.score(hidden)[0])
        assert got == pytest.approx(round(logit, 3) / 100, abs=1e-9)
    assert abs(scores["visual_smoothness"][0] - scores["visual_smoothness"][1]) > 1e-3
    from safetensors.torch import load_file, save_file

    weights = load_file(f"{path}/model.safetensors")
    del weights["score.bias"]
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing_keys \['score.bias'\]"):
        load_regression(path)


def test_pairs_stream_through_all_six_released_scorers_converted_on_first_use(ray_cluster, make_config, demo_manifest,
                                                                             tmp_path):
    """The released preset's shape on the mini-cluster: each Ray Data reward pool converts its dimension from a
    released reward/ tree on first use; the z-scored character is calibrated before any pair is made."""
    from anisora_ray.pairs.stage import run_pairs
    from anisora_ray.reward.statistics import RewardStatistics

    source = synthetic.write_released_tree(str(tmp_path / "reward"))
    common = f"source: '{source}', cache_dir: '{tmp_path / 'cache'}', device: cpu"
    options = {name: common for name in ("image_video", "text_video")}
    options |= {n: common + ", dtype: float32" for n in ("visual_smoothness", "visual_appeal")}
    options["visual_motion"] = common + f", clip_tokenizer: '{source}/clip-tokenizer'"
    options["character"] = common + ", detector: 'tiny:grounding-dino', segmenter: 'tiny:sam', box_threshold: 0.0, " \
                                    "text_threshold: 0.0"
    overrides = []
    for name, opts in options.items():
        overrides += [f"reward.dimensions.{name}.backend=released", f"reward.dimensions.{name}.options={{{opts}}}",
                      f"reward.dimensions.{name}.normalize={{kind: fixed, low: -2.0, high: 2.0}}"]
    cfg = make_config(*overrides, "reward.dimensions.character.normalize={kind: zscore}", "reward.calibration_prompts=2",
                      "generator.replicas=1", "generator.candidates_per_prompt=2", "pairs.keep_scores=true",
                      "generator.height=64", "generator.width=64")
    out = str(tmp_path / "pairs")
    result = run_pairs(cfg, demo_manifest, out, progress=False)
    assert result.pairs + sum(result.skipped.values()) == 3 and result.quarantined_candidates == 0
    stats = RewardStatistics.load(f"{out}/reward-statistics.json")
    assert list(stats.dimensions) == ["character"] and stats.dimensions["character"].count == 4  # 2 prompts x 2
    import glob

    import pyarrow.parquet as pq

    from anisora_ray.types import ScoredCandidate

    scored = [s for f in sorted(glob.glob(f"{out}/scores-*.parquet")) for s in ScoredCandidate.from_table(pq.read_table(f))]
    assert len(scored) == 6 and all(np.isfinite(v) for s in scored for v in s.raw_scores.values())
    assert {len(s.raw_scores) for s in scored} == {6}
    assert len(list((tmp_path / "cache" / "animereward").glob("*/*/.converted"))) == 6  # each converted once
