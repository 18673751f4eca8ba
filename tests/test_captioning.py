"""build-manifest without captions: a tiny random-init Qwen2-VL (built from a config, saved, loaded back with
``from_pretrained``) writes the prompts through the Ray Data job. A random model writes gibberish: these tests
check the plumbing (a caption per item, in order, in the manifest and the review file; bad items set aside)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from anisora_ray.cli import main
from anisora_ray.data.clips import captions_uri, quarantine_uri
from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.captioning import CAPTION_TEMPLATE
from anisora_ray.io import fs
from anisora_ray.types import QuarantineRecord
from tests.conftest import LOCAL_CONFIG


def captioner_args(model_cache: str) -> list[str]:
    return ["--config", LOCAL_CONFIG, "--captioner", "tiny:qwen2-vl", "--quiet",
            "--set", f"model.cache_dir={model_cache}", "--set", "data.captioner.max_new_tokens=6",
            "--set", "data.captioner.batch_size=2", "--set", "data.captioner.concurrency=2"]


@pytest.fixture
def map_batches_calls(monkeypatch):
    """The keyword arguments of every ``Dataset.map_batches`` call (the real one runs)."""
    import ray.data

    calls = []
    real = ray.data.Dataset.map_batches

    def recording(self, fn, *args, **kwargs):
        calls.append({"fn": fn, **kwargs})
        return real(self, fn, *args, **kwargs)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording)
    return calls


def read_jsonl(uri: str) -> list[dict]:
    return [json.loads(line) for line in fs.read_bytes(uri).decode().splitlines()]


def test_build_manifest_from_clips_without_captions_captions_them_on_gpu_actors(ray_cluster, tmp_path, model_cache,
                                                                                map_batches_calls, capsys):
    from anisora_ray.generation.captioning import CaptionActor
    from anisora_ray.io.video import write_video

    clips = tmp_path / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for name, shape in {"c_turn": (12, 48, 64, 3), "a_wave": (20, 64, 64, 3), "b_walk": (9, 32, 80, 3)}.items():
        write_video(rng.integers(0, 255, shape, dtype=np.uint8), str(clips / f"{name}.mp4"), fps=8)
    (clips / "d_broken.mp4").write_bytes(b"\x00\x00\x00 ftypisom truncated")
    out = tmp_path / "data" / "train.parquet"
    assert main(["build-manifest", "--videos", str(clips), "--out", str(out), *captioner_args(model_cache)]) == 0
    assert "3 prompts" in capsys.readouterr().out

    items = read_manifest(str(out))
    assert [i.prompt_id for i in items] == ["a_wave", "b_walk", "c_turn"]  # the clips' order
    assert all(i.prompt.strip() for i in items)
    assert all(i.image_uri.startswith(str(tmp_path / "data" / "first-frames")) for i in items)
    review = read_jsonl(captions_uri(str(out)))
    assert [(r["video"], r["prompt_id"], r["prompt"]) for r in review] == [(f"{i.prompt_id}.mp4", i.prompt_id, i.prompt)
                                                                         for i in items]
    assert {r["model"] for r in review} == {"tiny:qwen2-vl"} and {r["template"] for r in review} == {CAPTION_TEMPLATE}
    bad = QuarantineRecord.from_table(fs.read_table(quarantine_uri(str(out))))
    assert [(q.item_id, q.reason) for q in bad] == [("d_broken", "VideoDecodeError")]
    # The captions went through one Ray Data actor-pool stage, a (fake) GPU per actor.
    [call] = [c for c in map_batches_calls if c["fn"] is CaptionActor]
    assert call["num_gpus"] == 1.0 and call["compute"].min_size == 2 and call["batch_size"] == 2
    # The review file is a captions file: edited or not, it builds the manifest again.
    again = str(tmp_path / "again.parquet")
    assert main(["build-manifest", "--videos", str(clips), "--captions", captions_uri(str(out)), "--out", again]) == 0
    assert [(i.prompt_id, i.prompt) for i in read_manifest(again)] == [(i.prompt_id, i.prompt) for i in items]


def test_build_manifest_from_images_without_prompts_sets_an_unreadable_image_aside(ray_cluster, tmp_path, model_cache,
                                                                                   capsys):
    from PIL import Image

    from anisora_ray.io.images import save_image

    images = tmp_path / "images"
    for k, name in enumerate(("ren", "aki")):
        save_image(Image.new("RGB", (72 + 16 * k, 48), (40 + 150 * k, 90, 200)), str(images / f"{name}.png"))
    (images / "mio.png").write_bytes(b"not a png")
    out = str(tmp_path / "m.parquet")
    args = ["--set", "data.captioner.concurrency=1", "--set", "data.captioner.num_gpus=0"]
    assert main(["build-manifest", "--images", str(images), "--out", out, *captioner_args(model_cache), *args]) == 0
    assert "2 prompts" in capsys.readouterr().out
    items = read_manifest(out)
    assert [(i.prompt_id, i.image_uri) for i in items] == [(n, str(images / f"{n}.png")) for n in ("aki", "ren")]
    assert all(i.prompt.strip() for i in items)
    bad = QuarantineRecord.from_table(fs.read_table(quarantine_uri(out)))
    assert [(q.stage, q.item_id, q.reason) for q in bad] == [("caption", "mio", "ImageLoadError")]
    # The review file is a prompts file: edited or not, it builds the manifest again.
    assert main(["build-manifest", "--images", str(images), "--prompts", captions_uri(out), "--out", out + "2"]) == 0
    assert [(i.prompt_id, i.prompt) for i in read_manifest(out + "2")] == [(i.prompt_id, i.prompt) for i in items]


def test_the_tiny_captioner_loads_through_from_pretrained_and_sees_the_clip_frames(tmp_path, model_cache):
    from transformers import Qwen2VLForConditionalGeneration

    from anisora_ray.config.sections import CaptionerConfig
    from anisora_ray.data.clips import CaptionRequest
    from anisora_ray.generation.captioning import VisionCaptioner, check_captioner, instruction
    from anisora_ray.io.video import write_video

    path = check_captioner("tiny:qwen2-vl", model_cache)
    write_video(np.zeros((30, 60, 120, 3), np.uint8), str(tmp_path / "a.mp4"), fps=8)
    captioner = VisionCaptioner(path, CaptionerConfig(model=path, max_new_tokens=4, num_frames=8, frame_size=64))
    assert isinstance(captioner.model, Qwen2VLForConditionalGeneration)
    frames = captioner.media(CaptionRequest("a", str(tmp_path / "a.mp4"), "video"))
    assert len(frames) == 8 and {f.size for f in frames} == {(64, 32)}
    assert "These 8 images are frames" in instruction(CAPTION_TEMPLATE, "video", 8)
    missing = CaptionRequest("gone", str(tmp_path / "gone.mp4"), "video")
    first, second = captioner.caption([missing, CaptionRequest("a", str(tmp_path / "a.mp4"), "video")])
    assert first.reason == "VideoDecodeError" and not first.caption and second.caption and not second.reason

    class Faulty(VisionCaptioner):  # the device fails under it: every generate call raises what CUDA would
        fault: Exception = RuntimeError("CUDA error: an illegal memory access was encountered")

        def generate(self, media, kinds):
            raise self.fault

    faulty = Faulty(path, CaptionerConfig(model=path, max_new_tokens=4, num_frames=8, frame_size=64))
    with pytest.raises(RuntimeError, match="illegal memory access"):  # raised: not every clip set aside as its own
        faulty.caption([CaptionRequest("a", str(tmp_path / "a.mp4"), "video")] * 2)
    faulty.fault = torch.cuda.OutOfMemoryError("CUDA out of memory")  # an item too big alone: set aside, with why
    assert [r.reason for r in faulty.caption([CaptionRequest("a", str(tmp_path / "a.mp4"), "video")])] == [
        "OutOfMemoryError"]


def test_a_captioner_that_cannot_be_found_fails_before_ray(tmp_path, model_cache, capsys):
    from anisora_ray.errors import ConfigError
    from anisora_ray.generation.captioning import check_captioner

    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        check_captioner(str(tmp_path / "empty"), model_cache)
    with pytest.raises(ConfigError, match="random-base:qwen2-vl is not built"):
        check_captioner("random-base:qwen2-vl", model_cache)
    clips = tmp_path / "clips"
    clips.mkdir()
    assert main(["build-manifest", "--config", LOCAL_CONFIG, "--videos", str(clips),
                 "--out", str(tmp_path / "m.parquet"), "--captioner", str(tmp_path / "empty")]) == 2
    assert "--captions FILE" in capsys.readouterr().err
