"""A short warm start of the tiny pipeline, so the embedded default generates pictures, not noise.

A random-init VAE decodes any latent to coloured noise patches, and a random transformer ignores
its conditioning: preference alignment of such a generator has nothing to act on. Here, on
procedurally drawn clips of the demo's own characters (``anisora_ray.drawing``: species, colour and scene,
moving as the prompt's action says with an amplitude drawn per clip), the VAE is fitted as an
autoencoder and then the transformer as an image-to-video denoiser with the family's own training target
(CogVideoX: v-prediction at the scheduler's timesteps; Wan: flow matching on its shifted grid), conditioned as
its pipeline conditions, 10% empty prompts for classifier-free guidance.
Held-out characters are never drawn here: the training draws come from their own generator. A few
hundred steps on CPU give characters that keep their input image and move differently per seed:
something for AnimeReward to rank and GAPO to move. Deterministic for a given ``TinyModelConfig``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from anisora_ray.config import TinyModelConfig

log = logging.getLogger(__name__)

DRAW_SIZE = 128  # clips are drawn at this size, then area-resized, as the demo's images reach the pipeline
MOTIONS = {  # the demo's actions -> (sway x, bob y, drift x) in character-widths over the clip
    "waves hello": (0.0, 0.08, 0.0), "jumps with joy": (0.0, 0.35, 0.0), "turns around slowly": (0.12, 0.0, 0.0),
    "runs to the left": (0.0, 0.05, -0.6), "spins in a circle": (0.2, 0.2, 0.0), "nods and smiles": (0.0, 0.06, 0.0),
    "dances happily": (0.3, 0.1, 0.0), "looks up at the sky": (0.0, 0.12, 0.0),
}


def draw_clips(rng: np.random.Generator, batch: int, frames: int, height: int, width: int) -> tuple[np.ndarray, list[str]]:
    """uint8 [B, F, H, W, 3] clips of the demo's characters (``drawing.draw_frame``: species, colour, scene)
    moving as their prompt's action says, with an amplitude drawn per clip; their first frames are drawn
    like the demo's images. Returns the clips and the prompts, worded as the demo's."""
    import cv2

    from anisora_ray.drawing import COLOURS, SCENES, SPECIES, draw_frame

    clips = np.empty((batch, frames, height, width, 3), np.uint8)
    prompts = []
    size, s = DRAW_SIZE, DRAW_SIZE / 256
    for b in range(batch):
        species, colour = SPECIES[rng.integers(len(SPECIES))], list(COLOURS)[rng.integers(len(COLOURS))]
        scene, action = int(rng.integers(len(SCENES))), list(MOTIONS)[rng.integers(len(MOTIONS))]
        cx, cy = size / 2 + rng.uniform(-30, 30) * s, size * 0.55 + rng.uniform(-10, 10) * s
        sway, bob, drift = (m * rng.uniform(0.3, 1.5) * 100 * s for m in MOTIONS[action])
        phase = rng.uniform(0, 2 * np.pi)
        for f in range(frames):
            t = f / max(1, frames - 1)
            x = cx + sway * (np.sin(phase + 2 * np.pi * t) - np.sin(phase)) + drift * t
            y = cy - bob * abs(np.sin(np.pi * 2 * t))
            frame = np.asarray(draw_frame(species, COLOURS[colour], scene, size, x, y))
            clips[b, f] = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
        prompts.append(f"An anime-style {colour} {species} {action} {SCENES[scene][0]}, vivid colours, smooth motion")
    return clips, prompts


def to_video_tensor(clips: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [B, 3, F, H, W]


def reconstruction_loss(vae, x: torch.Tensor, first_frame_weight: float) -> torch.Tensor:
    """MSE of the VAE's reconstruction of ``x`` [B, 3, F, H, W] (the first frame weighted) plus a small KL."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample
    if first_frame_weight == 1.0:
        error = torch.nn.functional.mse_loss(recon, x)  # as cached models were built (bit for bit)
    else:
        per_frame = (recon - x).pow(2).mean(dim=(0, 1, 3, 4))
        weights = torch.ones_like(per_frame)
        weights[0] = first_frame_weight
        error = (per_frame * weights).sum() / weights.sum()
    return error + 1e-6 * posterior.kl().mean()


def warm_start(pipe, tiny: TinyModelConfig, height: int, width: int, num_frames: int, family) -> dict[str, float]:
    """Fit the VAE, then the denoiser (``family.warm_start_loss``: the family's own training target),
    ``tiny.warm_start_steps`` steps each; returns first and last losses."""
    steps, batch = tiny.warm_start_steps, tiny.warm_start_batch
    rng = np.random.default_rng(tiny.init_seed)
    vae = pipe.vae
    log.info("warm-starting the tiny generator: %d VAE + %d denoiser steps at %dx%d (once; cached)",
             steps, steps, width, height)
    began = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.init_seed)
        vae.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=tiny.warm_start_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        initial: dict[str, float] = {}
        for _ in range(steps):
            x = to_video_tensor(draw_clips(rng, batch, num_frames, height, width)[0])
            vae_loss = reconstruction_loss(vae, x, tiny.warm_start_vae_first_frame_weight)
            if tiny.warm_start_vae_images:  # single images: the first frame an image-to-video model starts from
                images = to_video_tensor(draw_clips(rng, tiny.warm_start_vae_images, 1, height, width)[0])
                vae_loss = vae_loss + reconstruction_loss(vae, images, 1.0)
            initial.setdefault("vae_loss_first", float(vae_loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            vae_loss.backward()
            optimizer.step()
            schedule.step()
        vae.eval().requires_grad_(False)

        trained = family.trained_module(pipe)
        trained.train().requires_grad_(True)
        optimizer = torch.optim.AdamW(trained.parameters(), lr=tiny.warm_start_lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        for _ in range(steps):
            clips, prompts = draw_clips(rng, batch, num_frames, height, width)
            prompts = ["" if rng.random() < 0.1 else p for p in prompts]
            denoise_loss = family.warm_start_loss(pipe, clips, prompts, tiny.warm_start_first_frame_weight,
                                                  tiny.max_text_seq_length)
            initial.setdefault("denoise_loss_first", float(denoise_loss.detach()))
            optimizer.zero_grad(set_to_none=True)
            denoise_loss.backward()
            optimizer.step()
            schedule.step()
        trained.eval().requires_grad_(False)
    seconds = time.perf_counter() - began
    log.info("tiny warm start: %d + %d steps in %.0fs (vae mse %.4f, denoise mse %.4f)", steps, steps, seconds,
             float(vae_loss.detach()), float(denoise_loss.detach()))
    return {**initial, "vae_loss": float(vae_loss.detach()), "denoise_loss": float(denoise_loss.detach()), "seconds": seconds}
