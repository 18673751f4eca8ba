"""The tiny pipeline's warm start: drawn clips are deterministic, and both fits make progress."""

import numpy as np

from anisora_ray.config import TinyModelConfig
from anisora_ray.drawing import COLOURS, SPECIES
from anisora_ray.models.families import get_family
from anisora_ray.models.tiny import build_tiny_i2v_pipeline
from anisora_ray.models.tiny_warmstart import MOTIONS, draw_clips, warm_start


def test_drawn_clips_are_the_demo_characters_deterministic_and_moving_as_their_prompt_says():
    clips, prompts = draw_clips(np.random.default_rng(3), 12, 9, 32, 32)
    again, _ = draw_clips(np.random.default_rng(3), 12, 9, 32, 32)
    assert clips.shape == (12, 9, 32, 32, 3) and clips.dtype == np.uint8 and np.array_equal(clips, again)
    for prompt in prompts:  # worded as the demo's prompts: colour, species, action
        assert prompt.startswith("An anime-style ") and any(f" {c} " in prompt for c in COLOURS)
        assert any(f" {s} " in prompt for s in SPECIES) and any(a in prompt for a in MOTIONS)
    motion = [np.abs(np.diff(c.astype(int), axis=0)).mean() for c in clips]
    assert all(m > 0 for m in motion)  # every action moves the character
    runs = [m for m, p in zip(motion, prompts, strict=True) if "runs to the left" in p]
    nods = [m for m, p in zip(motion, prompts, strict=True) if "nods" in p]
    if runs and nods:
        assert min(runs) > max(nods)  # the action sets how far it moves


def test_warm_start_fits_the_vae_and_the_denoiser():
    tiny = TinyModelConfig(warm_start_steps=25, warm_start_lr=4e-3)
    pipe = build_tiny_i2v_pipeline(tiny, 32, 32, 9)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    losses = warm_start(pipe, tiny, 32, 32, 9, get_family("cogvideox_i2v"))
    assert losses["vae_loss"] < 0.7 * losses["vae_loss_first"]
    assert losses["denoise_loss"] < losses["denoise_loss_first"]
    assert any(not v.equal(before[k]) for k, v in pipe.transformer.state_dict().items())
    assert not pipe.vae.training and not pipe.transformer.training


def test_the_vae_loss_weights_the_first_frame_and_new_knobs_leave_cached_keys_alone():
    import torch

    from anisora_ray.models.tiny import key_fields, tiny_fingerprint
    from anisora_ray.models.tiny_wan import build_tiny_wan_pipeline, tiny_wan_fingerprint
    from anisora_ray.models.tiny_warmstart import reconstruction_loss

    tiny = TinyModelConfig(wan_variant="wan22_ti2v", vae_blocks=2, vae_channels=8, latent_channels=4)
    vae = build_tiny_wan_pipeline(tiny).vae
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1

    def loss(weight):
        torch.manual_seed(0)  # the posterior sample: the same draw for every weighting
        return reconstruction_loss(vae, x, weight)

    torch.manual_seed(0)
    posterior = vae.encode(x).latent_dist
    per_frame = (vae.decode(posterior.sample()).sample - x).pow(2).mean(dim=(0, 1, 3, 4))
    kl = 1e-6 * posterior.kl().mean()
    assert torch.allclose(loss(1.0), per_frame.mean() + kl, atol=1e-6)
    weighted = (per_frame[0] * 4 + per_frame[1:].sum()) / (4 + len(per_frame) - 1)
    assert torch.allclose(loss(4.0), weighted + kl, atol=1e-6) and not torch.allclose(loss(4.0), loss(1.0))

    plain = TinyModelConfig()
    assert "warm_start_vae_images" not in key_fields(plain)  # at their defaults: keys of cached models unchanged
    tuned = TinyModelConfig(warm_start_vae_images=16, warm_start_vae_first_frame_weight=8.0)
    assert key_fields(tuned)["warm_start_vae_images"] == 16
    assert tiny_fingerprint(tuned, 32, 32, 9) != tiny_fingerprint(plain, 32, 32, 9)
    assert tiny_wan_fingerprint(tuned, 32, 32, 9) != tiny_wan_fingerprint(plain, 32, 32, 9)
