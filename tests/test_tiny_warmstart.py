"""The tiny pipeline's warm start: drawn clips are deterministic, and both fits make progress."""

import numpy as np

from anisora_ray.config import TinyModelConfig
from anisora_ray.models.tiny import build_tiny_i2v_pipeline
from anisora_ray.models.tiny_warmstart import PALETTE, draw_clips, warm_start


def test_drawn_clips_are_deterministic_move_and_name_their_colour():
    clips, prompts = draw_clips(np.random.default_rng(3), 6, 9, 32, 32)
    again, _ = draw_clips(np.random.default_rng(3), 6, 9, 32, 32)
    assert clips.shape == (6, 9, 32, 32, 3) and clips.dtype == np.uint8 and np.array_equal(clips, again)
    assert all(any(f" {name} " in p for name in PALETTE) for p in prompts)
    moving = [i for i, p in enumerate(prompts) if "runs" in p]
    assert moving and all(np.abs(clips[i, -1].astype(int) - clips[i, 0]).sum() > 0 for i in moving)


def test_warm_start_fits_the_vae_and_the_denoiser():
    tiny = TinyModelConfig(warm_start_steps=25, warm_start_lr=4e-3)
    pipe = build_tiny_i2v_pipeline(tiny, 32, 32, 9)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    losses = warm_start(pipe, tiny, 32, 32, 9)
    assert losses["vae_loss"] < 0.7 * losses["vae_loss_first"]
    assert losses["denoise_loss"] < losses["denoise_loss_first"]
    assert any(not v.equal(before[k]) for k, v in pipe.transformer.state_dict().items())
    assert not pipe.vae.training and not pipe.transformer.training
