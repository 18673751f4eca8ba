"""GAPO on the real tiny CogVideoX I2V transformer: shared noise, a frozen reference, the margin moves the right way."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from anisora_ray.gapo.diffusion import PairLatents, gapo_step, pair_errors
from anisora_ray.models.families import NoiseDraw, get_family
from anisora_ray.models.families.cogvideox_i2v import encode_videos

FAMILY = get_family("cogvideox_i2v")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from anisora_ray.config import load_config
    from anisora_ray.models.pipeline import load_i2v_pipeline, resolve_pretrained
    from tests.conftest import LOCAL_CONFIG

    cfg = load_config(LOCAL_CONFIG, [f"model.cache_dir={tmp_path_factory.mktemp('gapo-model')}", "generator.height=32", "model.tiny.warm_start_steps=0",
                                     "generator.width=32", "generator.num_frames=9"])
    return load_i2v_pipeline(resolve_pretrained(cfg.model, cfg.generator), device="cpu")


def pair_latents(pipe, rewards=((0.9, 0.2),)) -> PairLatents:
    rng = np.random.default_rng(0)
    b = len(rewards)
    winners = rng.integers(0, 255, (b, 9, 32, 32, 3), dtype=np.uint8)
    losers = rng.integers(0, 255, (b, 9, 32, 32, 3), dtype=np.uint8)
    w = encode_videos(pipe, winners)
    first = encode_videos(pipe, winners[:, :1])  # the first frames' latents (posterior mode), zero-padded over time
    image = torch.cat([first, first.new_zeros((b, w.shape[1] - 1, *first.shape[2:]))], dim=1)
    embeds = FAMILY.encode_prompt(pipe, "a girl waves", FAMILY.text_length(pipe, None))
    return PairLatents(winner=w, loser=encode_videos(pipe, losers), condition={"image": image},
                       prompt_embeds=torch.stack([embeds] * b),
                       reward_w=torch.tensor([r[0] for r in rewards]), reward_l=torch.tensor([r[1] for r in rewards]))


def test_latent_shapes_and_shared_noise(pipe):
    batch = pair_latents(pipe)
    t, hw = pipe.vae_scale_factor_temporal, 32 // pipe.vae_scale_factor_spatial  # the demo's VAE: 2x time, 2x space
    expected = (1, (9 - 1) // t + 1, pipe.vae.config.latent_channels, hw, hw)
    image = batch.condition["image"]
    assert batch.winner.shape == batch.loser.shape == image.shape == expected == (1, 5, 8, 16, 16)
    assert torch.count_nonzero(image[:, 1:]) == 0  # only the first latent frame carries the image
    same = PairLatents(batch.winner, batch.winner, batch.condition, batch.prompt_embeds, batch.reward_w, batch.reward_l)
    noise = torch.randn(batch.winner.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err_w, err_l = pair_errors(FAMILY, pipe, pipe.transformer, same, NoiseDraw(noise, torch.tensor([500])))
    torch.testing.assert_close(err_w, err_l)  # identical videos + shared noise and t → identical errors


def test_gapo_steps_on_the_tiny_transformer_raise_the_margin(pipe):
    batch = pair_latents(pipe)
    model = copy.deepcopy(pipe.transformer).train()
    reference = pipe.transformer.eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    margins = []
    for _ in range(4):
        out = gapo_step(FAMILY, pipe, model, reference, batch, torch.Generator().manual_seed(7), beta=500.0)
        margins.append(float(out.margin.detach()))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # model == reference at the start
    assert margins[-1] > margins[0] and np.isfinite(margins).all()
    assert float(out.gain) == pytest.approx(2**0.9 - 2**0.2)
