"""The tiny pipeline goes through save_pretrained / from_pretrained like a real checkpoint."""

import os

import numpy as np
import pytest
import torch

from anisora_ray.config import GeneratorConfig, ModelConfig, TinyModelConfig, VideoConfig
from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.generator import Generator
from anisora_ray.models.families import get_family
from anisora_ray.models.pipeline import load_i2v_pipeline, resolve_pretrained
from anisora_ray.models.tiny import build_tiny_i2v_pipeline, save_tiny_i2v_pipeline
from anisora_ray.types import GenerationRequest

GEN = GeneratorConfig(height=32, width=32, num_frames=9, num_inference_steps=3)


def test_build_is_deterministic_for_init_seed():
    a = build_tiny_i2v_pipeline(TinyModelConfig(init_seed=1), 32, 32, 9).transformer.state_dict()
    b = build_tiny_i2v_pipeline(TinyModelConfig(init_seed=1), 32, 32, 9).transformer.state_dict()
    c = build_tiny_i2v_pipeline(TinyModelConfig(init_seed=2), 32, 32, 9).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_round_trip_gives_identical_videos(tmp_path, demo_manifest):
    item = read_manifest(demo_manifest)[0]
    path = save_tiny_i2v_pipeline(TinyModelConfig(), 32, 32, 9, str(tmp_path / "tiny"))
    files = {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}
    assert "model_index.json" in files and "transformer/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # safetensors only

    in_memory = build_tiny_i2v_pipeline(TinyModelConfig(), 32, 32, 9)
    in_memory.set_progress_bar_config(disable=True)
    loaded = load_i2v_pipeline(path, device="cpu")
    assert not loaded.transformer.training

    gen = Generator.__new__(Generator)  # render() with either pipeline, same code
    gen.cfg, gen.family = GEN, get_family("cogvideox_i2v")
    request = GenerationRequest(item, (11, 12))
    gen.pipe = in_memory
    expected = gen.render([request])
    gen.pipe = loaded
    got = gen.render([request])
    again = gen.render([request])
    assert got.shape == (2, 9, 32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, again)
    assert not np.array_equal(got[0], got[1])  # distinct seeds, distinct videos


def test_resolve_pretrained_caches_tiny_and_passes_real_ids(tmp_path):
    model = ModelConfig(cache_dir=str(tmp_path))
    first = resolve_pretrained(model, GEN)
    mtime = os.path.getmtime(os.path.join(first, "model_index.json"))
    assert resolve_pretrained(model, GEN) == first
    assert os.path.getmtime(os.path.join(first, "model_index.json")) == mtime
    other = resolve_pretrained(model, GeneratorConfig(height=48, width=48, num_frames=9))
    assert other != first  # geometry is part of the tiny model (learned positional embeddings)
    real = ModelConfig(pretrained="THUDM/CogVideoX-5b-I2V")
    assert resolve_pretrained(real, GEN) == "THUDM/CogVideoX-5b-I2V"


def test_generator_writes_candidates_and_quarantines_missing_image(tmp_path, demo_manifest):
    items = read_manifest(demo_manifest)
    path = save_tiny_i2v_pipeline(TinyModelConfig(), 32, 32, 9, str(tmp_path / "tiny"))
    gen = Generator(path, ModelConfig(), GEN, VideoConfig(), weights_version=3)
    ghost = items[1].__class__("ghost", "nothing", str(tmp_path / "missing.png"))
    requests = [GenerationRequest(items[0], (1, 2)), GenerationRequest(ghost, (3, 4)), GenerationRequest(items[2], (5, 6))]
    candidates, quarantined = gen.generate(requests, str(tmp_path / "out"))
    assert [(c.prompt_id, c.seed) for c in candidates] == [(items[0].prompt_id, 1), (items[0].prompt_id, 2),
                                                           (items[2].prompt_id, 5), (items[2].prompt_id, 6)]
    assert all(c.weights_version == 3 and os.path.getsize(c.video_uri) > 0 for c in candidates)
    assert len(quarantined) == 1
    q = quarantined[0]
    assert (q.stage, q.item_id, q.reason) == ("generation", "ghost", "ImageLoadError") and "missing.png" in q.detail


@pytest.mark.parametrize(("blocks", "spatial", "temporal"), [(2, 2, 2), (3, 4, 4), (4, 8, 4)])
def test_vae_blocks_set_the_latent_geometry_the_pipeline_and_trainer_follow(tmp_path, demo_manifest, blocks, spatial,
                                                                           temporal):
    from anisora_ray.config import load_config
    from anisora_ray.gapo.models import load_transformer_pipeline
    from tests.conftest import LOCAL_CONFIG

    tiny = TinyModelConfig(vae_blocks=blocks, vae_channels=8, latent_channels=4)
    path = save_tiny_i2v_pipeline(tiny, 32, 32, 9, str(tmp_path / "tiny"))
    pipe = load_i2v_pipeline(path, device="cpu")
    assert (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal) == (spatial, temporal)
    assert pipe.transformer.config.sample_height == 32 // spatial
    gen = Generator.__new__(Generator)
    gen.cfg, gen.pipe, gen.family = GEN, pipe, get_family("cogvideox_i2v")
    video = gen.render([GenerationRequest(read_manifest(demo_manifest)[0], (1,))])
    assert video.shape == (1, 9, 32, 32, 3)
    cfg = load_config(LOCAL_CONFIG, ["generator.height=32", "generator.width=32", "generator.num_frames=9"])
    trainer = load_transformer_pipeline(path, cfg, "cpu")  # the GAPO worker reads the factors from the VAE config
    assert (trainer.vae_scale_factor_spatial, trainer.vae_scale_factor_temporal) == (spatial, temporal)
