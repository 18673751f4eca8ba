"""Wan image-to-video (Wan2.1-I2V-14B, Wan2.2-TI2V-5B, Wan2.2-I2V-A14B; AniSora V2/V3) through diffusers'
``WanImageToVideoPipeline``.

Latents are [B, C, F, h, w], normalized by the VAE's ``latents_mean`` / ``latents_std``. The condition is what
``WanImageToVideoPipeline.prepare_latents`` builds (called here, so it is the pipeline's by construction):

- Wan2.1 / Wan2.2-A14B: [mask; VAE latents of the image followed by zero frames] concatenated to the noise on
  channels, plus (Wan2.1) the CLIP image tokens as ``encoder_hidden_states_image``;
- Wan2.2-TI2V (``expand_timesteps``): the first latent frame is replaced by the image's latents and its
  tokens get timestep 0; that frame is given, not generated, so it is masked out of the error.

Training target: rectified flow (``models/objectives.py``): σ drawn on the scheduler's shifted training grid,
x_σ = (1 − σ)·x₀ + σ·ε, target ε − x₀. Two experts (A14B) are one trained module, :class:`Experts`; each
micro-batch trains the expert the pipeline uses at its σ: the expert is drawn with the share of the grid it
covers (from a generator every rank seeds alike, so ZeRO's collectives line up), then σ within its share.
A LoRA adapter goes on both experts, and a refresh publishes both.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from anisora_ray.models.families import GeneratorFamily, NoiseDraw, load_pipeline
from anisora_ray.models.objectives import (
    draw_sigmas,
    expert_grid,
    expert_index,
    first_frame_mask,
    masked_error,
    noised,
    scheduler_shift,
)

ENCODERS = ("vae", "text_encoder", "tokenizer", "image_encoder", "image_processor")


class Experts(torch.nn.Module):
    """Wan2.2-A14B's two experts as one module: ``transformer`` (t ≥ boundary) and ``transformer_2`` (below);
    ``forward(expert=i, **kwargs)`` runs expert i. Parameter names carry the expert's name."""

    _repeated_blocks: ClassVar[list[str]] = ["WanTransformerBlock"]  # what regional compile compiles

    def __init__(self, transformer, transformer_2):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2

    def forward(self, expert: int = 0, **kwargs):
        return (self.transformer if int(expert) == 0 else self.transformer_2)(**kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to_json_string(self) -> str:
        """The experts' configs (a full-weights folder's ``config.json``)."""
        import json

        return json.dumps({name: dict(getattr(self, name).config) for name in ("transformer", "transformer_2")},
                          indent=2, sort_keys=True, default=str)

    # LoRA (peft through diffusers' adapter API) on both experts
    @property
    def peft_config(self):
        return getattr(self.transformer, "peft_config", None)

    def add_adapter(self, config, adapter_name: str) -> None:
        self.transformer.add_adapter(config, adapter_name=adapter_name)
        self.transformer_2.add_adapter(config, adapter_name=adapter_name)

    def enable_adapters(self) -> None:
        self.transformer.enable_adapters()
        self.transformer_2.enable_adapters()

    def disable_adapters(self) -> None:
        self.transformer.disable_adapters()
        self.transformer_2.disable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()
        self.transformer_2.enable_gradient_checkpointing()


class WanI2V(GeneratorFamily):
    name = "wan_i2v"
    attention_dispatcher = True  # WanAttnProcessor calls diffusers' dispatch_attention_fn
    description = "Wan2.1 / Wan2.2 image-to-video through diffusers' WanImageToVideoPipeline (AniSora V2/V3)"

    def tiny_builders(self):
        from anisora_ray.models.tiny_wan import save_tiny_wan_pipeline, tiny_wan_fingerprint

        return tiny_wan_fingerprint, save_tiny_wan_pipeline

    def load(self, pretrained: str, dtype: str, device: str, revision: str | None, parts: str = "all"):
        from diffusers import WanImageToVideoPipeline

        skip = {"all": {}, "trainer": {n: None for n in ENCODERS},
                "encoders": {"transformer": None, "transformer_2": None}}[parts]
        return load_pipeline(WanImageToVideoPipeline, pretrained, dtype, device, revision, skip)

    def use_sampler(self, pipe, generator) -> None:
        """``generator.flow_shift`` replaces the scheduler's static shift (UniPC's ``flow_shift``, FlowMatchEuler's
        ``shift``); GAPO's training grid is read from the same scheduler, so it follows."""
        if generator.flow_shift is not None:
            config = pipe.scheduler.config
            if config.get("use_dynamic_shifting", False):
                raise ValueError(f"generator.flow_shift: {type(pipe.scheduler).__name__} shifts dynamically "
                                 "(use_dynamic_shifting); a static shift does not apply")
            key = "flow_shift" if "flow_shift" in config else "shift"
            pipe.scheduler = type(pipe.scheduler).from_config(config, **{key: float(generator.flow_shift)})
        super().use_sampler(pipe, generator.model_copy(update={"flow_shift": None}))

    def trained_module(self, pipe) -> torch.nn.Module:
        if getattr(pipe, "transformer_2", None) is None:
            return pipe.transformer
        if "_anisora_experts" not in pipe.__dict__:  # one container per pipeline: its names are the weights'
            pipe.__dict__["_anisora_experts"] = Experts(pipe.transformer, pipe.transformer_2)
        return pipe.__dict__["_anisora_experts"]

    def render(self, pipe, images, prompts, generators, cfg, steps=None) -> np.ndarray:
        """One pipeline call per run of the same (image, prompt): the Wan I2V pipeline takes one image a call."""
        videos, start = [], 0
        while start < len(images):
            end = start + 1
            while end < len(images) and images[end] is images[start] and prompts[end] == prompts[start]:
                end += 1
            out = pipe(image=images[start], prompt=[prompts[start]] * (end - start), height=cfg.height,
                       width=cfg.width, num_frames=cfg.num_frames, num_inference_steps=steps or cfg.num_inference_steps,
                       guidance_scale=cfg.guidance_scale, generator=generators[start:end], output_type="np",
                       negative_prompt=[cfg.negative_prompt] * (end - start) if cfg.negative_prompt else None,
                       max_sequence_length=cfg.max_sequence_length)
            videos.append(np.asarray(out.frames))
            start = end
        return np.concatenate(videos)

    # ---- training ----
    def text_length(self, pipe, cfg) -> int:
        return cfg.max_sequence_length  # the pipeline pads the embeddings to the length it was called with

    @torch.no_grad()
    def encode_video(self, encoders, frames: np.ndarray) -> torch.Tensor:
        return self.encode_videos(encoders, frames[None])[0]

    @torch.no_grad()
    def encode_videos(self, encoders, clips: np.ndarray) -> torch.Tensor:
        """Normalized latents of uint8 clips [B, F, H, W, 3] in one VAE call."""
        vae = encoders.vae
        x = torch.from_numpy(np.ascontiguousarray(clips)).to(vae.device).permute(0, 4, 1, 2, 3)
        latents = vae.encode(x.to(vae.dtype) / 127.5 - 1.0).latent_dist.mode()
        return self._normalize(vae, latents)

    @staticmethod
    def _normalize(vae, latents: torch.Tensor) -> torch.Tensor:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return (latents - mean) / std

    @torch.no_grad()
    def encode_condition(self, encoders, image, seed, height, width, num_frames) -> dict[str, torch.Tensor]:
        device = encoders.vae.device
        pixels = encoders.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
        frames = (num_frames - 1) // encoders.vae_scale_factor_temporal + 1
        s = encoders.vae_scale_factor_spatial
        blank = torch.zeros((1, encoders.vae.config.z_dim, frames, height // s, width // s), device=device)
        out = encoders.prepare_latents(pixels, 1, encoders.vae.config.z_dim, height, width, num_frames,
                                       torch.float32, device, None, blank)
        condition = {"condition": out[1][0]}  # [C', F, h, w] (TI2V: the first frame's latents [C, 1, h, w])
        if encoders.image_encoder is not None:  # Wan2.1: CLIP's penultimate hidden states
            condition["image_embeds"] = encoders.encode_image(image, device)[0]
        return condition

    @torch.no_grad()
    def encode_prompt(self, encoders, text: str, length: int) -> torch.Tensor:
        embeds, _ = encoders.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=length,
                                           device=encoders.text_encoder.device)
        return embeds[0]

    @staticmethod
    def two_experts(pipe) -> bool:
        return getattr(pipe, "transformer_2", None) is not None and pipe.config.boundary_ratio is not None

    def draw(self, pipe, shape, generator, shared=None, device=None, timesteps=None) -> NoiseDraw:
        """σ uniform over the shifted training grid, or over the rollout's ``timesteps`` (σ = t / N exactly); with two
        experts, first the expert (with the share of the grid, or of the rollout's steps, it covers), then σ in it."""
        device = device or generator.device
        config = pipe.scheduler.config
        shift, n = scheduler_shift(config), int(config.num_train_timesteps)
        noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
        pool = None if timesteps is None else timesteps.double().cpu()
        expert, allowed = 0, None
        if self.two_experts(pipe):  # each candidate σ's expert: the training grid's, or the rollout timesteps'
            experts = (expert_grid(shift, pipe.config.boundary_ratio, n) if pool is None
                       else expert_index(pool, pipe.config.boundary_ratio, n))
            share = float((experts == 1).double().mean())  # how much of the grid (or rollout) transformer_2 covers
            pick = shared if shared is not None else generator
            expert = int(float(torch.rand((), generator=pick, device=pick.device)) < share)
            allowed = experts == expert
        if pool is None:
            sigmas, drawn = draw_sigmas(shape[0], generator, shift, n, device, allowed)
        else:
            pool = pool if allowed is None else pool[allowed]
            index = torch.randint(0, pool.numel(), (shape[0],), generator=generator, device=generator.device).cpu()
            drawn = pool[index].float().to(device)
            sigmas = drawn / n
        return NoiseDraw(noise, drawn, sigmas, expert)

    def errors(self, pipe, model, latents, condition, prompt_embeds, draw, frame_weights=None) -> torch.Tensor:
        x0 = latents
        noise = draw.noise.to(x0.dtype)
        x_t = noised(x0, noise, draw.sigmas)
        weight = None
        if pipe.config.expand_timesteps:  # TI2V: the first frame is the condition, at timestep 0
            mask = first_frame_mask(tuple(x0.shape), x0.device)
            hidden = (1 - mask) * condition["condition"] + mask * x_t
            p = (pipe.transformer or pipe.transformer_2).config.patch_size
            tokens = mask[0, 0][:: p[0], :: p[1], :: p[2]].flatten()
            timestep = tokens[None] * draw.timesteps[:, None]
            weight = mask
        else:
            hidden = torch.cat([x_t, condition["condition"].to(x_t.dtype)], dim=1)
            timestep = draw.timesteps
        if frame_weights is not None:
            frames = frame_weights.view(1, 1, -1, 1, 1).to(x0.device)
            weight = frames if weight is None else weight * frames
        kwargs = {"hidden_states": hidden.to(model.dtype), "timestep": timestep,
                  "encoder_hidden_states": prompt_embeds.to(model.dtype), "return_dict": False}
        if "image_embeds" in condition:
            kwargs["encoder_hidden_states_image"] = condition["image_embeds"].to(model.dtype)
        if self.two_experts(pipe):
            kwargs["expert"] = draw.expert
        prediction = model(**kwargs)[0]
        return masked_error(prediction, noise - x0, weight)

    def warm_start_loss(self, pipe, clips: np.ndarray, prompts: list[str], first_frame_weight: float,
                        text_length: int) -> torch.Tensor:
        """Flow matching on clean clips, conditioned as the pipeline conditions; draws from torch's global RNG."""
        from PIL import Image

        _, frames, height, width, _ = clips.shape
        latents = self.encode_videos(pipe, clips)
        conditions = [self.encode_condition(pipe, Image.fromarray(clip[0]), 0, height, width, frames) for clip in clips]
        condition = {k: torch.stack([c[k] for c in conditions]) for k in conditions[0]}
        embeds = torch.stack([self.encode_prompt(pipe, p, text_length) for p in prompts])
        draw = self.draw(pipe, tuple(latents.shape), torch.default_generator)
        weights = torch.ones(latents.shape[2])
        weights[0] = first_frame_weight
        return self.errors(pipe, self.trained_module(pipe), latents, condition, embeds, draw, weights).mean()
