"""VBench-style video metrics (weight-free and learned forms) and the version comparison of `anisora-ray eval`."""

import math

import cv2
import numpy as np
import pytest

from anisora_ray.config.sections import VideoMetricsConfig
from anisora_ray.errors import ConfigError
from anisora_ray.eval.compare import compare_versions, markdown_table, reward_win_rate
from anisora_ray.eval.vbench import (
    VideoMetrics,
    dynamic_degree,
    motion_smoothness,
    score_videos,
    subject_consistency,
    thumbnail_features,
)


def _textured(size=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return np.kron(small, np.ones((8, 8, 1), dtype=np.uint8))  # blocks: trackable by optical flow


def _moving(frames=16, shift=4, size=64) -> np.ndarray:
    base = _textured(size)
    return np.stack([np.roll(base, shift * t, axis=1) for t in range(frames)])


def test_motion_smoothness_is_one_for_linear_change_and_lower_for_flicker():
    ramp = np.stack([np.full((16, 16, 3), 10 * t, np.uint8) for t in range(9)])  # brightness rises linearly
    assert motion_smoothness(ramp) == pytest.approx(1.0)
    flicker = np.stack([np.full((16, 16, 3), 200 * (t % 2), np.uint8) for t in range(9)])
    assert motion_smoothness(flicker) == pytest.approx(1 - 200 / 255)
    assert math.isnan(motion_smoothness(ramp[:2]))


def test_dynamic_degree_tells_a_moving_video_from_a_still_one():
    still = np.stack([_textured()] * 16)
    assert dynamic_degree(still, fps=8) == 0.0
    assert dynamic_degree(_moving(shift=4), fps=8) == 1.0
    # VBench's threshold: 6 px at a 256-px side, scaled to the frame (64 px -> 1.5 px per frame)
    assert dynamic_degree(_moving(shift=1), fps=8) == 0.0


def test_subject_consistency_rewards_staying_with_the_input_image():
    image = _textured(seed=1)
    same = thumbnail_features(np.stack([image] * 9))
    assert subject_consistency(same[0], same[1:]) == pytest.approx(1.0)
    other = np.stack([_textured(seed=s) for s in range(2, 11)])
    drifted = thumbnail_features(np.concatenate([image[None], other]))
    assert subject_consistency(drifted[0], drifted[1:]) < 0.6


def test_learned_forms_load_dino_and_the_laion_head_through_from_pretrained(tmp_path):
    import torch
    from safetensors.torch import save_file

    from anisora_ray.models.tiny_reward import resolve_backbone
    from anisora_ray.reward.encoders import Backbone

    cache = str(tmp_path / "cache")
    clip = Backbone("tiny:clip", cache_dir=cache, text=False)
    dim = clip.model.config.projection_dim
    torch.manual_seed(0)
    head = {"weight": torch.randn(1, dim), "bias": torch.tensor([5.0])}
    save_file(head, str(tmp_path / "head.safetensors"))
    torch.save(head, str(tmp_path / "head.pth"))
    frames = _moving(frames=9, size=32)
    image = frames[0]
    for name in ("head.safetensors", "head.pth"):
        cfg = VideoMetricsConfig(subject_backbone="tiny:dinov2", aesthetic_backbone="tiny:clip",
                                 aesthetic_head=str(tmp_path / name), cache_dir=cache, device="cpu")
        scores = VideoMetrics(cfg).score(frames, image, fps=8)
        with torch.no_grad():
            feats = torch.nn.functional.normalize(clip.image_features(frames), dim=-1)
            expected = float((feats @ head["weight"].T + head["bias"]).mean()) / 10
        assert scores["aesthetic_quality"] == pytest.approx(expected, rel=1e-5)
        assert 0.0 <= scores["subject_consistency"] <= 1.0
        # the condition image at its own size (the demo's are 256 px): scored as the weight-free branch scores it
        big = VideoMetrics(cfg).score(frames, cv2.resize(image, (128, 128), interpolation=cv2.INTER_CUBIC), fps=8)
        assert set(big) == set(scores) and all(math.isfinite(big[k]) for k, v in scores.items() if math.isfinite(v))
    assert "config.json" in __import__("os").listdir(resolve_backbone("tiny:dinov2", cache))
    # the frames are what DINO compares with the image: a still video of the image conforms and holds together
    # exactly, noise frames do not (a metric fed the image alone scored both 1.0)
    subject = VideoMetrics(VideoMetricsConfig(subject_backbone="tiny:dinov2", cache_dir=cache, device="cpu"))
    still = subject.score(np.repeat(image[None], 9, axis=0), image, fps=8)["subject_consistency"]
    noise = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    noisy = subject.score(noise, image, fps=8)["subject_consistency"]
    assert still == pytest.approx(1.0, abs=1e-5) and noisy < still - 1e-3, (still, noisy)

    save_file({"weight": torch.randn(2, dim), "bias": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="bad.safetensors.*weight"):
        VideoMetrics(VideoMetricsConfig(aesthetic_backbone="tiny:clip", aesthetic_head=str(tmp_path / "bad.safetensors"),
                                        cache_dir=cache, device="cpu"))
    with pytest.raises(ConfigError, match="go together"):
        VideoMetrics(VideoMetricsConfig(aesthetic_backbone="tiny:clip", cache_dir=cache))


def test_score_videos_quarantines_an_unreadable_video_and_scores_the_rest(ray_cluster, tmp_path):
    from PIL import Image

    from anisora_ray.io.images import save_image
    from anisora_ray.io.video import write_video

    image_uri = str(tmp_path / "image.png")
    save_image(Image.fromarray(_textured(seed=3)), image_uri)
    rows = []
    for i, shift in enumerate((0, 4)):
        uri = str(tmp_path / f"v{i}.mp4")
        write_video(np.stack([np.roll(_textured(seed=3), shift * t, axis=1) for t in range(12)]), uri, fps=8, crf=0)
        rows.append({"prompt_id": f"p{i}", "seed": i, "video_uri": uri, "image_uri": image_uri, "fps": 8, "other": i})
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    rows.append({"prompt_id": "p2", "seed": 2, "video_uri": str(tmp_path / "broken.mp4"), "image_uri": image_uri, "fps": 8,
                 "other": 2})
    out = score_videos(rows, VideoMetricsConfig())
    assert [r["other"] for r in out] == [0, 1, 2]  # every row comes back, in order, with its own keys
    assert out[0]["dynamic_degree"] == 0.0 and out[1]["dynamic_degree"] == 1.0
    assert out[0]["subject_consistency"] > 0.99  # still, and x264 lossless up to yuv420 chroma: the input image
    assert out[2]["metrics_error"]  # quarantined with the reason it could not be read
    assert math.isnan(out[2]["motion_smoothness"]) and not out[0]["metrics_error"]


def test_video_metrics_are_computed_again_when_the_config_asks_for_other_forms(ray_cluster, tmp_path):
    """An eval folder's video-metrics.parquet records the forms it was computed in: read back under a config with
    DINO instead of thumbnails (an align job's, reused by eval), it is computed again, not credited to DINO."""
    import json
    import os

    import pyarrow as pa
    from PIL import Image

    from anisora_ray.eval.vbench import FORMS_FILE, METRICS_FILE, ensure_video_metrics, metric_forms
    from anisora_ray.io import fs
    from anisora_ray.io.images import save_image
    from anisora_ray.io.video import write_video

    image_uri = str(tmp_path / "image.png")
    save_image(Image.fromarray(_textured(seed=5)), image_uri)
    write_video(np.stack([np.roll(_textured(seed=5), 3 * t, axis=1) for t in range(9)]), str(tmp_path / "v.mp4"), fps=8)
    fs.write_table(pa.Table.from_pylist([{"prompt_id": "p", "seed": 1, "video_uri": str(tmp_path / "v.mp4"),
                                          "image_uri": image_uri, "fps": 8, "quarantine_reason": None}]),
                   str(tmp_path / "scores.parquet"))
    thumbnails, dino = VideoMetricsConfig(), VideoMetricsConfig(subject_backbone="tiny:dinov2",
                                                                 cache_dir=str(tmp_path / "cache"), device="cpu")
    uri = ensure_video_metrics(str(tmp_path), thumbnails)
    first = fs.read_table(uri).to_pylist()[0]["subject_consistency"]
    assert json.loads((tmp_path / FORMS_FILE).read_text()) == metric_forms(thumbnails)
    made = os.path.getmtime(tmp_path / METRICS_FILE)
    ensure_video_metrics(str(tmp_path), thumbnails)
    assert os.path.getmtime(tmp_path / METRICS_FILE) == made  # the same forms: read back
    again = fs.read_table(ensure_video_metrics(str(tmp_path), dino)).to_pylist()[0]["subject_consistency"]
    assert again != first and json.loads((tmp_path / FORMS_FILE).read_text()) == metric_forms(dino)


def _rows(rewards: dict[tuple[str, int], float]) -> list[dict]:
    return [{"prompt_id": p, "seed": s, "reward": r, "quarantine_reason": None} for (p, s), r in rewards.items()]


def test_compare_versions_pairs_by_prompt_and_seed_and_counts_wins():
    rng = np.random.default_rng(0)
    base = {(f"p{i}", s): float(rng.uniform(0.3, 0.6)) for i in range(12) for s in range(2)}
    better = {k: v + 0.05 for k, v in base.items()}
    better[("p0", 0)] = base[("p0", 0)] - 0.01  # one candidate got worse
    same = dict(base)
    tables = {"round-0": _rows(base), "trained": _rows(better), "copy": _rows(same)}
    tables["trained"].append({"prompt_id": "p99", "seed": 0, "reward": 0.9, "quarantine_reason": None})  # unpaired
    tables["trained"][1]["quarantine_reason"] = "NaN reward"  # (p0, 1) does not count
    c = compare_versions(tables, "round-0", ["reward"], samples=500)
    win = c["versions"]["trained"]["reward_win_rate"]
    assert (win["wins"], win["losses"], win["ties"], win["n"]) == (22, 1, 0, 23)
    assert win["ci_low"] < 22 / 23 < win["ci_high"]
    gain = c["versions"]["trained"]["metrics"]["reward"]
    assert gain["ci_low"] > 0 and gain["p_value"] < 0.01 and gain["num_prompts"] == 12
    assert reward_win_rate(tables["round-0"], tables["copy"])["ties"] == 24
    assert c["versions"]["copy"]["metrics"]["reward"]["mean_diff"] == 0.0
    # the means are over the prompts every version scored (not p99): their difference is the paired gain
    assert c["mean_prompts"] == {"reward": 12}
    assert c["means"]["trained"]["reward"] - c["means"]["round-0"]["reward"] == pytest.approx(gain["mean_diff"])
    table = markdown_table(c, {"trained": {"win_rate": 0.6, "win_rate_ci": [0.4, 0.8], "wins": 6, "judged": 10,
                                           "fleiss_kappa": 0.3}})
    assert "| reward (n=12) | " in table and "0.600 [0.400, 0.800] (6 of 10; kappa 0.30)" in table and "no study" in table
    with pytest.raises(KeyError, match="baseline"):
        compare_versions(tables, "round-9", ["reward"])


def test_a_prompts_means_are_over_the_seeds_every_version_scored():
    """A candidate one version lost (a NaN character score, quarantined) leaves the comparison: a prompt's means are
    over the same seeds in every version, or a version better on every shared seed could show a loss."""
    base = {(f"p{i}", s): 0.5 + 0.1 * s + 0.01 * i for i in range(6) for s in range(2)}
    better = {k: v + 0.05 for k, v in base.items()}
    tables = {"base": _rows(base), "better": _rows(better)}
    tables["better"][1]["reward"] = float("nan")  # (p0, 1): the high seed, lost in "better" only
    c = compare_versions(tables, "base", ["reward"], samples=200)
    gain = c["versions"]["better"]["metrics"]["reward"]
    assert gain["mean_diff"] == pytest.approx(0.05) and gain["wins"] == 6  # before: p0 compared seed 0 with both seeds
    assert c["means"]["better"]["reward"] - c["means"]["base"]["reward"] == pytest.approx(gain["mean_diff"])
