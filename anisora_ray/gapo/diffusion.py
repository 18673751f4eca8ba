"""The diffusion side of GAPO for CogVideoX image-to-video: latents in, per-sample prediction errors out.

Winner and loser of a pair are noised with the **same noise and timestep**, conditioned on the
prompt and on the image latents each was generated from (the pipeline samples them with the video's
seed: :func:`encode_image_latents`), and passed through the transformer in one batched call
(``[winners; losers]``); the error is the MSE against the scheduler's prediction target
(v for v-prediction, as CogVideoX; ε for epsilon models). The reference model runs the same
inputs under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from anisora_ray.gapo.loss import GapoLoss, gapo_loss, prediction_error
from anisora_ray.models.pipeline import scale_latents


@dataclass(frozen=True)
class PairLatents:
    winner: torch.Tensor  # [B, F, C, h, w] scaled video latents
    loser: torch.Tensor  # [B, F, C, h, w]
    image: torch.Tensor  # [B, F, C, h, w] the winner's image latents (first frame; zeros over the other frames)
    prompt_embeds: torch.Tensor  # [B, L, D]
    reward_w: torch.Tensor  # [B] normalized rewards
    reward_l: torch.Tensor  # [B]
    loser_image: torch.Tensor | None = None  # the loser's, drawn with its own seed (None: ``image``)


@torch.no_grad()
def encode_videos(pipe, frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] → scaled VAE latents [B, F', C, h, w] (the posterior mode: deterministic)."""
    device, dtype = pipe.vae.device, pipe.vae.dtype
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0
    latents = pipe.vae.encode(x).latent_dist.mode()  # [B, C, F', h, w]
    return scale_latents(pipe.vae, latents).permute(0, 2, 1, 3, 4).contiguous()


@torch.no_grad()
def encode_first_frames(pipe, images: np.ndarray, latent_frames: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] → first-frame latents (posterior mode) zero-padded to ``latent_frames``."""
    first = encode_videos(pipe, images[:, None])  # [B, 1, C, h, w]
    padding = first.new_zeros((first.shape[0], latent_frames - 1, *first.shape[2:]))
    return torch.cat([first, padding], dim=1)


@torch.no_grad()
def encode_image_latents(pipe, images: list, seeds: list[int], height: int, width: int, latent_frames: int,
                         patch_size_t: int | None = None) -> torch.Tensor:
    """The image latents [B, F, C, h, w] the I2V pipeline conditions a rollout on, computed as
    ``CogVideoXImageToVideoPipeline`` does: its ``video_processor`` resizes and normalizes each PIL image,
    the VAE posterior is *sampled* with a ``torch.Generator`` seeded by the video's seed (the generator's
    first draw, before the noise), scaled by ``vae_scaling_factor_image`` and zero-padded over time."""
    vae = pipe.vae
    device, dtype = vae.device, vae.dtype
    pixels = pipe.video_processor.preprocess(images, height=height, width=width).to(device, dtype=dtype).unsqueeze(2)
    drawn = [vae.encode(pixels[i : i + 1]).latent_dist.sample(torch.Generator(device=device).manual_seed(int(seed)))
             for i, seed in enumerate(seeds)]
    latents = torch.cat(drawn).to(dtype).permute(0, 2, 1, 3, 4)  # [B, 1, C, h, w]
    factor = pipe.vae_scaling_factor_image
    latents = latents / factor if vae.config.get("invert_scale_latents", False) else latents * factor
    latents = torch.cat([latents, latents.new_zeros((latents.shape[0], latent_frames - 1, *latents.shape[2:]))], dim=1)
    if patch_size_t is not None:  # CogVideoX 1.5: the first frame is repeated to fill a temporal patch
        latents = torch.cat([latents[:, : latents.shape[1] % patch_size_t], latents], dim=1)
    return latents


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], max_sequence_length: int | None = None) -> torch.Tensor:
    """T5 prompt embeddings [B, L, D]; L defaults to the transformer's text length (its learned
    positional embeddings are sized for it)."""
    length = max_sequence_length or pipe.transformer.config.max_text_seq_length
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length,
                                   device=pipe.text_encoder.device)
    return embeds


def rotary_embeddings(pipe, height: int, width: int, latent_frames: int, device=None):
    """The transformer's rotary position embeddings for this geometry (None when it uses none)."""
    if not pipe.transformer.config.use_rotary_positional_embeddings:
        return None
    return pipe._prepare_rotary_positional_embeddings(height, width, latent_frames, device or pipe.transformer.device)


def prediction_errors(transformer, scheduler, batch: PairLatents, noise: torch.Tensor, timesteps: torch.Tensor,
                      rotary=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample prediction errors of winners and losers, in one batched call with shared noise and t."""
    latents = torch.cat([batch.winner, batch.loser])
    noise2, t2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
    noisy = scheduler.add_noise(latents, noise2, t2)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise2, t2)
    elif scheduler.config.prediction_type == "epsilon":
        target = noise2
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    loser_image = batch.image if batch.loser_image is None else batch.loser_image
    hidden = torch.cat([noisy, torch.cat([batch.image, loser_image])], dim=2).to(transformer.dtype)
    text = torch.cat([batch.prompt_embeds] * 2).to(transformer.dtype)
    prediction = transformer(hidden_states=hidden, encoder_hidden_states=text,
                             timestep=t2, image_rotary_emb=rotary, return_dict=False)[0]
    errors = prediction_error(prediction, target)
    b = batch.winner.shape[0]
    return errors[:b], errors[b:]


def gapo_step(model, reference, scheduler, batch: PairLatents, generator: torch.Generator, *, beta: float = 5000.0,
              alpha: float = 2.0, use_gain: bool = True, rotary=None) -> GapoLoss:
    """One GAPO loss evaluation: sample shared noise and timesteps, model errors with grad, reference without."""
    b = batch.winner.shape[0]
    noise = torch.randn(batch.winner.shape, generator=generator, device=batch.winner.device, dtype=batch.winner.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator,
                              device=batch.winner.device).long()
    model_w, model_l = prediction_errors(model, scheduler, batch, noise, timesteps, rotary)
    with torch.no_grad():
        ref_w, ref_l = prediction_errors(reference, scheduler, batch, noise, timesteps, rotary)
    return gapo_loss(model_w, model_l, ref_w, ref_l, batch.reward_w, batch.reward_l, beta=beta, alpha=alpha,
                     use_gain=use_gain)
