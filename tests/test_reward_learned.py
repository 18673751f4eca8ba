"""Learned reward backends on tiny random-init backbones, loaded through the real from_pretrained path."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from anisora_ray.errors import ConfigError
from anisora_ray.models.tiny_reward import TINY_KINDS, resolve_backbone, save_tiny_backbone
from anisora_ray.reward import ClipBatch, build_dimension
from anisora_ray.reward.encoders import Backbone, RegressionHead
from anisora_ray.reward.learned import token_dim
from anisora_ray.types import DIMENSIONS

RNG = np.random.default_rng(0)
CLIPS = [RNG.integers(0, 255, (12, 48, 48, 3), dtype=np.uint8) for _ in range(3)]


def batch(clips=CLIPS, prompts=None, images=None, references=None, character_ids=None) -> ClipBatch:
    n = len(clips)
    return ClipBatch(frames=list(clips), prompts=prompts or [f"prompt {i}" for i in range(n)],
                     images=images or [c[0] for c in clips], references=references or [None] * n,
                     character_ids=character_ids)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("reward-backbones"))


def test_tiny_backbones_round_trip_deterministically(cache, tmp_path):
    for kind in TINY_KINDS:
        path = resolve_backbone(f"tiny:{kind}", cache)
        assert resolve_backbone(f"tiny:{kind}", cache) == path  # cached, not rebuilt
    frames = CLIPS[0][:4]
    a = Backbone("tiny:clip", cache_dir=cache).image_features(frames)
    b = Backbone(save_tiny_backbone("clip", str(tmp_path / "clip-again")), cache_dir=cache).image_features(frames)
    assert a.shape == (4, 24) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)  # same seed and config → same weights through save/load
    with pytest.raises(ValueError, match="unknown tiny backbone 'bert'"):
        resolve_backbone("tiny:bert", cache)


def test_xclip_motion_is_the_probability_of_the_first_prompt(cache):
    prompts = ["lots of movement", "standing still"]
    forward = build_dimension("visual_motion", "xclip", backbone="tiny:xclip", cache_dir=cache, prompts=prompts)
    backward = build_dimension("visual_motion", "xclip", backbone="tiny:xclip", cache_dir=cache, prompts=prompts[::-1])
    p, q = forward.score(batch()), backward.score(batch())
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    np.testing.assert_allclose(p + q, 1.0, atol=1e-5)  # a two-way softmax, read from either side
    np.testing.assert_allclose(forward.score(batch(CLIPS[:1])), p[:1], atol=1e-5)  # independent of batch mates
    # through X-CLIP's own forward: the prompts are conditioned on each video by its prompt generator
    from anisora_ray.reward.encoders import l2, pooled
    from anisora_ray.reward.learned import even_indices

    m, k = forward.backbone.model, forward.backbone.num_frames
    with torch.no_grad():
        pix = torch.stack([forward.backbone.pixels(c[even_indices(len(c), k)]) for c in CLIPS])
        out = m(pixel_values=pix, **forward.prompt_tokens)
        np.testing.assert_allclose(p, (100 * out.logits_per_video / m.logit_scale.exp()).softmax(-1)[:, 0], atol=1e-5)
        plain = l2(pooled(m.get_text_features(**forward.prompt_tokens)))  # unconditioned: what it used to compare with
        assert not np.allclose(p, (100 * l2(out.video_embeds) @ plain.T).softmax(-1)[:, 0].numpy(), atol=1e-4)


def test_consistency_zero_shot_is_cosine_and_prefers_the_matching_image(cache):
    still = np.repeat(CLIPS[0][:1], 6, axis=0)  # every frame is the first-frame image
    other = CLIPS[1][:6]
    image_video = build_dimension("image_video", "clip", backbone="tiny:clip", cache_dir=cache)
    s = image_video.score(batch([still, other], images=[still[0], still[0]]))
    assert s[0] == pytest.approx(1.0, abs=1e-5) and s[1] < s[0]
    text_video = build_dimension("text_video", "clip", backbone="tiny:clip", cache_dir=cache)
    t = text_video.score(batch([still, other], prompts=["a red girl", "a red girl"]))
    assert ((t >= -1) & (t <= 1)).all() and t[0] != t[1]
    # the prompt is what it is compared with: the same clip scores otherwise under another prompt, and each score is
    # the cosine of the clip's mean frame feature with the prompt's text feature
    u = text_video.score(batch([still, still], prompts=["a red girl", "a blue dragon flies over the sea"]))
    assert abs(u[0] - u[1]) > 1e-4 and u[0] == pytest.approx(t[0], abs=1e-6)
    with torch.no_grad():
        frames = torch.nn.functional.normalize(text_video._frame_features([still])[0].mean(0), dim=-1)
        for prompt, got in zip(["a red girl", "a blue dragon flies over the sea"], u, strict=True):
            text = torch.nn.functional.normalize(text_video.backbone.text_features([prompt])[0], dim=-1)
            assert got == pytest.approx(float((frames * text.to(frames.device)).sum()), abs=1e-5)


def test_heads_save_load_and_score(cache, tmp_path):
    appeal = build_dimension("visual_appeal", "siglip", backbone="tiny:siglip", cache_dir=cache, training=True, keyframes=4)
    smooth = build_dimension("visual_smoothness", "learned", backbone="tiny:clip", cache_dir=cache, training=True)
    assert token_dim(appeal) == 32 and token_dim(smooth) == 48  # SigLIP width; CLIP [f_t, f_t+1 - f_t]
    for name, dim, backend, extra in [("visual_appeal", appeal, "siglip", dict(backbone="tiny:siglip", keyframes=4)),
                                      ("visual_smoothness", smooth, "learned", dict(backbone="tiny:clip"))]:
        torch.manual_seed(0)
        head = RegressionHead(token_dim(dim), hidden=8, label_mean=3.0, label_std=2.0)
        head_dir = head.save(str(tmp_path / name))
        scorer = build_dimension(name, backend, cache_dir=cache, head=head_dir, **extra)
        with torch.no_grad():
            expected = [float(head.to(t.device)(t)) for t in dim.tokens(batch())]
        np.testing.assert_allclose(scorer.score(batch()), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="visual_appeal: option 'head' is required.*train-reward"):
        build_dimension("visual_appeal", "siglip", backbone="tiny:siglip", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="nowhere.* is missing head.json"):
        RegressionHead.load(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['keyframe'\].*accepted: \[.*'keyframes'"):
        build_dimension("visual_appeal", "siglip", keyframe=4)


def test_character_scores_against_the_reference_and_a_gallery(cache, tmp_path):
    from PIL import Image

    from anisora_ray.io.images import save_image
    from anisora_ray.reward.character import build_gallery, load_gallery

    options = dict(detector="tiny:grounding-dino", segmenter="tiny:sam", embedder="tiny:clip", cache_dir=cache,
                   box_threshold=0.0, text_threshold=0.0, frames=4)
    character = build_dimension("character", "grounded", **options)
    a, b = CLIPS[0][0], CLIPS[1][0]
    still_a = np.repeat(a[None], 6, axis=0)
    crops = character.crops(still_a[:2])
    assert len(crops) == 2 and crops[0].shape == (32, 32, 3)  # boxed, masked, resized for the embedder
    s = character.score(batch([still_a, still_a], images=[a, b]))
    assert s[0] == pytest.approx(1.0, abs=1e-4) and s[1] < s[0]  # its own reference vs another's

    for cid, image in [("alice", a), ("bob", b)]:
        save_image(Image.fromarray(image), str(tmp_path / "refs" / cid / "ref.png"))
    meta = build_gallery(character, str(tmp_path / "refs"), str(tmp_path / "gallery.safetensors"))
    assert meta["ids"] == ["alice", "bob"]
    ids, emb = load_gallery(str(tmp_path / "gallery.safetensors"))
    assert ids == ["alice", "bob"] and emb.shape == (2, 24)
    with_gallery = build_dimension("character", "grounded", gallery=str(tmp_path / "gallery.safetensors"), **options)
    # Each clip against its own character: the same clip of alice, as prompt alice's and as prompt bob's candidate
    g = with_gallery.score(batch([still_a, still_a], images=[b, a], character_ids=["alice", "bob"]))
    assert g[0] == pytest.approx(1.0, abs=1e-4)  # the gallery entry of its id, not the first-frame image (b)
    assert g[1] < g[0] - 1e-3  # bob's entry, though bob's first-frame image would be this clip itself
    # No entry for the id (or no id): the clip's first-frame image is its reference
    fallback = with_gallery.score(batch([still_a, still_a], images=[a, b], character_ids=["carol", None]))
    np.testing.assert_allclose(fallback, s, atol=1e-5)
    with pytest.raises(ValueError, match="no reference images found"):
        build_gallery(character, str(tmp_path / "refs" / "alice"), str(tmp_path / "g2.safetensors"))


def test_a_character_whose_mask_is_empty_is_cropped_by_its_box_not_blacked_out(cache, monkeypatch):
    """SAM may find nothing inside a detected box: the crop is then the box (as released), not a black square whose
    embedding still scores."""
    options = dict(detector="tiny:grounding-dino", segmenter="tiny:sam", embedder="tiny:clip", cache_dir=cache,
                   box_threshold=0.0, text_threshold=0.0, frames=4)
    character = build_dimension("character", "grounded", **options)
    frames = np.repeat(CLIPS[0][0][None], 2, axis=0)
    h, w = frames.shape[1:3]
    box = (2, 3, w - 4, h - 2)
    masks = iter([np.zeros((h, w), bool), np.ones((h, w), bool)])  # empty, then the whole frame
    monkeypatch.setattr(character.detect, "regions", lambda fs: [(box, next(masks)) for _ in fs])
    empty, full = character.crops(frames[:1]), character.crops(frames[1:])
    assert empty[0].any() and np.array_equal(empty[0], full[0])  # the box's pixels, as an all-true mask gives


def learned_overrides(cache: str, heads: dict[str, str]) -> list[str]:
    """All six dimensions on learned backends with tiny backbones (fixed ranges wide enough for random models)."""
    dims = {
        "visual_smoothness": ("learned", f"{{backbone: 'tiny:clip', head: '{heads['visual_smoothness']}'}}"),
        "visual_motion": ("xclip", "{backbone: 'tiny:xclip'}"),
        "visual_appeal": ("siglip", f"{{backbone: 'tiny:siglip', head: '{heads['visual_appeal']}'}}"),
        "text_video": ("clip", "{backbone: 'tiny:clip'}"),
        "image_video": ("clip", "{backbone: 'tiny:clip'}"),
        "character": ("grounded", "{detector: 'tiny:grounding-dino', segmenter: 'tiny:sam', embedder: 'tiny:clip', "
                                  "box_threshold: 0.0, text_threshold: 0.0, frames: 2}"),
    }
    out = []
    for name, (backend, options) in dims.items():
        out += [f"reward.dimensions.{name}.backend={backend}",
                f"reward.dimensions.{name}.options={options[:-1]}, cache_dir: '{cache}'}}",
                f"reward.dimensions.{name}.normalize={{kind: fixed, low: -10.0, high: 10.0}}"]
    return out


def test_score_stage_runs_all_six_learned_backends_on_actors(ray_cluster, make_config, cache, tmp_path, demo_manifest):
    from anisora_ray.generation.stage import run_generation
    from anisora_ray.reward.stage import run_scoring

    heads = {}
    for name, width in [("visual_smoothness", 48), ("visual_appeal", 32)]:
        torch.manual_seed(0)
        heads[name] = RegressionHead(width, hidden=8).save(str(tmp_path / name))
    cfg = make_config(*learned_overrides(cache, heads), "generator.replicas=1", "generator.candidates_per_prompt=2",
                      "data.demo_prompts=2")
    generated = run_generation(cfg, demo_manifest, str(tmp_path / "gen"), progress=False)
    result = run_scoring(cfg, generated.candidates_uri, str(tmp_path / "scores.parquet"), progress=False)
    assert len(result.scored) == len(generated.candidates) and not result.quarantined
    for s in result.scored:
        assert set(s.raw_scores) == set(DIMENSIONS) and all(np.isfinite(v) for v in s.raw_scores.values())
        assert 0.0 <= s.reward <= 1.0



def test_the_real_config_uses_the_released_reward_and_its_presets_name_valid_backends_and_options():
    from anisora_ray.config import load_config
    from anisora_ray.reward.base import check_options

    configs = os.path.join(os.path.dirname(__file__), "..", "configs")
    cfg = load_config(os.path.join(configs, "cogvideox5b_i2v.yaml"))
    dims = cfg.reward.dimensions.as_dict()
    assert {d.backend for d in dims.values()} == {"released"}  # AnimeReward as released, by default
    assert not any("my-bucket" in str(d.options) for d in dims.values())
    for name, dim in dims.items():
        check_options(name, dim.backend, dim.options)
        assert dim.actor.num_gpus == 1 and dim.options["source"] == "IndexTeam/Index-anisora"
    zero_shot = load_config(os.path.join(configs, "reward", "zero-shot.yaml")).reward.dimensions.as_dict()
    assert {d.backend for d in zero_shot.values()} == {"classical", "xclip", "clip", "grounded"}
    for name, dim in zero_shot.items():
        check_options(name, dim.backend, dim.options)
