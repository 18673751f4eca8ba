"""A short warm start of the tiny pipeline, so the embedded default generates pictures, not noise.

A random-init VAE decodes any latent to coloured noise patches, and a random transformer ignores
its conditioning: preference alignment of such a generator has nothing to act on. Here, on
procedurally drawn clips (a coloured character on a two-colour gradient, drifting at a random
speed, its colour named in the prompt), the VAE is fitted as an autoencoder and then the
transformer as an image-to-video denoiser (v-prediction at the scheduler's timesteps, the first
frame's latents as condition, 10% empty prompts for classifier-free guidance). A few hundred steps
on CPU give blurry characters whose motion and colour vary with the seed: something for AnimeReward
to rank and GAPO to move. Deterministic for a given ``TinyModelConfig``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from anisora_ray.config import TinyModelConfig
from anisora_ray.models.pipeline import scale_latents

log = logging.getLogger(__name__)

PALETTE = {"red": (220, 40, 40), "green": (60, 190, 70), "blue": (50, 90, 220), "yellow": (235, 210, 50),
           "purple": (150, 70, 200), "orange": (240, 140, 30), "pink": (240, 130, 180), "white": (240, 240, 240)}
SPECIES = ("cat", "fox", "bunny", "girl", "robot", "bear")


def draw_clips(rng: np.random.Generator, batch: int, frames: int, height: int, width: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [B, F, H, W, 3] clips of a character drifting over a gradient, and their prompts."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    clips = np.empty((batch, frames, height, width, 3), np.float32)
    prompts = []
    names = list(PALETTE)
    for b in range(batch):
        top, bottom = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
        background = top + (bottom - top) * (yy / max(1, height - 1))[..., None]
        name = names[rng.integers(len(names))]
        colour = np.asarray(PALETTE[name], np.float32)
        radius = rng.uniform(0.18, 0.3) * min(height, width)
        cx, cy = rng.uniform(0.35, 0.65) * width, rng.uniform(0.4, 0.65) * height
        speed = rng.uniform(0.0, 0.25) * radius
        angle = rng.uniform(0, 2 * np.pi)
        vx, vy = speed * np.cos(angle), speed * np.sin(angle)
        for f in range(frames):
            x, y = cx + vx * f, cy + vy * f
            body = ((xx - x) / radius) ** 2 + ((yy - y) / (1.15 * radius)) ** 2 <= 1.0
            eyes = np.zeros_like(body)
            for side in (-0.35, 0.35):
                eyes |= (xx - (x + side * radius)) ** 2 + (yy - (y - 0.2 * radius)) ** 2 <= (0.12 * radius) ** 2
            frame = background.copy()
            frame[body] = colour
            frame[eyes] = (20, 20, 30)
            clips[b, f] = frame
        moving = "runs across the scene" if speed > 0.1 * radius else "stands still and breathes"
        prompts.append(f"An anime-style {name} {SPECIES[rng.integers(len(SPECIES))]} {moving}, vivid colours")
    return clips.round().astype(np.uint8), prompts


def _to_video_tensor(clips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [B, 3, F, H, W]


def warm_start(pipe, tiny: TinyModelConfig, height: int, width: int, num_frames: int) -> dict[str, float]:
    """Fit the VAE, then the transformer, ``tiny.warm_start_steps`` steps each; returns first and last losses."""
    steps, batch = tiny.warm_start_steps, tiny.warm_start_batch
    rng = np.random.default_rng(tiny.init_seed)
    vae, transformer, scheduler = pipe.vae, pipe.transformer, pipe.scheduler
    log.info("warm-starting the tiny generator: %d VAE + %d denoiser steps at %dx%d (once; cached)",
             steps, steps, width, height)
    began = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.init_seed)
        vae.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=tiny.warm_start_lr)
        initial: dict[str, float] = {}
        for _ in range(steps):
            x = _to_video_tensor(draw_clips(rng, batch, num_frames, height, width)[0])
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
            vae_loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
            initial.setdefault("vae_loss_first", float(vae_loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            vae_loss.backward()
            optimizer.step()
        vae.eval().requires_grad_(False)

        transformer.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(transformer.parameters(), lr=tiny.warm_start_lr)
        rotary = pipe._prepare_rotary_positional_embeddings(height, width, (num_frames - 1) // 4 + 1, "cpu") \
            if transformer.config.use_rotary_positional_embeddings else None
        for _ in range(steps):
            clips, prompts = draw_clips(rng, batch, num_frames, height, width)
            prompts = ["" if rng.random() < 0.1 else p for p in prompts]
            with torch.no_grad():
                latents = scale_latents(vae, vae.encode(_to_video_tensor(clips)).latent_dist.mode()).permute(0, 2, 1, 3, 4)
                first = scale_latents(vae, vae.encode(_to_video_tensor(clips[:, :1])).latent_dist.mode()).permute(0, 2, 1, 3, 4)
                image = torch.cat([first, first.new_zeros((batch, latents.shape[1] - 1, *first.shape[2:]))], dim=1)
                embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                               max_sequence_length=transformer.config.max_text_seq_length, device="cpu")
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
            noisy = scheduler.add_noise(latents, noise, t)
            target = scheduler.get_velocity(latents, noise, t)
            prediction = transformer(hidden_states=torch.cat([noisy, image], dim=2), encoder_hidden_states=embeds,
                                     timestep=t, image_rotary_emb=rotary, return_dict=False)[0]
            denoise_loss = torch.nn.functional.mse_loss(prediction, target)
            initial.setdefault("denoise_loss_first", float(denoise_loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            denoise_loss.backward()
            optimizer.step()
        transformer.eval().requires_grad_(False)
    seconds = time.perf_counter() - began
    log.info("tiny warm start: %d + %d steps in %.0fs (vae mse %.4f, denoise mse %.4f)", steps, steps, seconds,
             float(vae_loss.detach()), float(denoise_loss.detach()))
    return {**initial, "vae_loss": float(vae_loss.detach()), "denoise_loss": float(denoise_loss.detach()), "seconds": seconds}
