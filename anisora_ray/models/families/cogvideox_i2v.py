"""CogVideoX image-to-video (``THUDM/CogVideoX-5b-I2V``, AniSora V1): the paper's generator.

Latents are [B, F, C, h, w], scaled by the VAE's factor. The image condition is the first frame's VAE
posterior *sampled* with the video's seed (the pipeline's first draw, before the noise), scaled by
``vae_scaling_factor_image`` and zero-padded over time, concatenated to the noisy latents on channels.
Training target: v-prediction DDPM (zero-SNR betas), t uniform over the training timesteps, the error over
every position (the model generates the first frame too). Rotary position embeddings follow the geometry.
"""

from __future__ import annotations

import numpy as np
import torch

from anisora_ray.errors import ConfigError
from anisora_ray.models.families import GeneratorFamily, NoiseDraw, load_pipeline
from anisora_ray.models.objectives import ddpm_target, masked_error

ENCODERS = ("vae", "text_encoder", "tokenizer")


def scale_latents(vae, latents: torch.Tensor, factor: float | None = None) -> torch.Tensor:
    """VAE posterior latents → the transformer's latent space (CogVideoX scales by the VAE's factor, or by the
    pipeline's image factor for the condition; some VAEs invert the factor)."""
    factor = vae.config.scaling_factor if factor is None else factor
    return latents / factor if vae.config.get("invert_scale_latents", False) else latents * factor


class CogVideoXI2V(GeneratorFamily):
    name = "cogvideox_i2v"
    description = "CogVideoX image-to-video through diffusers' CogVideoXImageToVideoPipeline (AniSora V1)"
    batched_cfg_layout = "BFCHW"  # one transformer call per step on [uncond; cond] latents [B, F, C, H, W]

    def tiny_builders(self):
        from anisora_ray.models.tiny import save_tiny_i2v_pipeline, tiny_fingerprint

        return tiny_fingerprint, save_tiny_i2v_pipeline

    def load(self, pretrained: str, dtype: str, device: str, revision: str | None, parts: str = "all"):
        from diffusers import AutoencoderKLCogVideoX, CogVideoXImageToVideoPipeline

        skip = {"all": {}, "trainer": {n: None for n in ENCODERS}, "encoders": {"transformer": None}}[parts]
        pipe = load_pipeline(CogVideoXImageToVideoPipeline, pretrained, dtype, device, revision, skip)
        if parts == "encoders":  # the image latents follow the transformer's temporal patch (CogVideoX 1.5)
            from diffusers import CogVideoXTransformer3DModel

            config = CogVideoXTransformer3DModel.load_config(pretrained, subfolder="transformer", revision=revision)
            pipe.transformer_patch_size_t = config.get("patch_size_t")
        if parts == "trainer":  # rotary embeddings need the VAE's compression factors: read from its config
            if pipe.transformer.config.patch_size_t is not None:
                raise ConfigError(
                    f"model.pretrained={pretrained!r} is a CogVideoX 1.5 transformer (patch_size_t="
                    f"{pipe.transformer.config.patch_size_t}): its pipeline pads the latent frames to whole temporal "
                    "patches and drops the padding after sampling, which GAPO's training step does not reproduce yet "
                    "(rollouts work; training would fail on every step). Use CogVideoX-5b-I2V (AniSora V1) or a "
                    "Wan checkpoint")
            vae = AutoencoderKLCogVideoX.load_config(pretrained, subfolder="vae", revision=revision)
            pipe.vae_scale_factor_spatial = 2 ** (len(vae["block_out_channels"]) - 1)
            pipe.vae_scale_factor_temporal = vae["temporal_compression_ratio"]
        return pipe

    def trained_module(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    def use_sampler(self, pipe, generator) -> None:
        if generator.scheduler == "dpm":  # the same training grid and noising: GAPO's objective is unchanged
            from diffusers import CogVideoXDPMScheduler

            pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
            generator = generator.model_copy(update={"scheduler": "pretrained"})
        super().use_sampler(pipe, generator)

    def geometry_problems(self, pipe, cfg) -> list[str]:
        """Also: CogVideoX 1.0's VAE decodes an odd number of latent frames only (an even one gives 4 frames per
        latent frame, not ``num_frames``), and learned positional embeddings fix the size, the frame count and the
        prompt length the transformer was built for (other sizes fail in every call, other frame counts swap in
        sin-cos embeddings it never saw)."""
        problems = super().geometry_problems(pipe, cfg)
        t, spatial, temporal = pipe.transformer.config, pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        latent = (cfg.num_frames - 1) // temporal + 1
        if t.patch_size_t is None and latent % 2 == 0:
            problems.append(f"generator.num_frames = {cfg.num_frames} is {latent} latent frames, an even number the "
                            f"VAE does not decode to {cfg.num_frames} frames (use {2 * temporal}k+1, e.g. 49)")
        if t.use_learned_positional_embeddings:
            size = (t.sample_height * spatial, t.sample_width * spatial)
            if (cfg.height, cfg.width) != size:
                problems.append(f"generator.height x width = {cfg.height}x{cfg.width}: its learned positional "
                                f"embeddings are for {size[0]}x{size[1]}")
            if cfg.num_frames != t.sample_frames:
                problems.append(f"generator.num_frames = {cfg.num_frames}: its learned positional embeddings are for "
                                f"{t.sample_frames}")
            if cfg.max_sequence_length != t.max_text_seq_length:
                problems.append(f"generator.max_sequence_length = {cfg.max_sequence_length}: its learned positional "
                                f"embeddings are for {t.max_text_seq_length} prompt tokens")
        return problems

    def render(self, pipe, images, prompts, generators, cfg, steps=None) -> np.ndarray:
        out = pipe(image=images, prompt=prompts, height=cfg.height, width=cfg.width, num_frames=cfg.num_frames,
                   num_inference_steps=steps or cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                   negative_prompt=[cfg.negative_prompt] * len(prompts) if cfg.negative_prompt else None,
                   generator=generators, output_type="np", max_sequence_length=cfg.max_sequence_length)
        return np.asarray(out.frames)

    # ---- training ----
    def text_length(self, pipe, cfg) -> int:
        return pipe.transformer.config.max_text_seq_length  # its learned positional embeddings are sized for it

    @torch.no_grad()
    def encode_video(self, encoders, frames: np.ndarray) -> torch.Tensor:
        return encode_videos(encoders, frames[None])[0]

    def condition_uses_seed(self) -> bool:
        return True

    @torch.no_grad()
    def encode_condition(self, encoders, image, seed, height, width, num_frames) -> dict[str, torch.Tensor]:
        frames = (num_frames - 1) // encoders.vae_scale_factor_temporal + 1
        patch_t = getattr(encoders, "transformer_patch_size_t", None)
        if encoders.transformer is not None:
            patch_t = encoders.transformer.config.patch_size_t
        return {"image": encode_image_latents(encoders, [image], [seed], height, width, frames, patch_t)[0]}

    @torch.no_grad()
    def encode_prompt(self, encoders, text: str, length: int) -> torch.Tensor:
        embeds, _ = encoders.encode_prompt([text], do_classifier_free_guidance=False, max_sequence_length=length,
                                           device=encoders.text_encoder.device)
        return embeds[0]

    def draw(self, pipe, shape, generator, shared=None, device=None, timesteps=None) -> NoiseDraw:
        device = device or generator.device
        noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
        pool = torch.arange(pipe.scheduler.config.num_train_timesteps) if timesteps is None else timesteps.long().cpu()
        pick = torch.randint(0, pool.numel(), (shape[0],), generator=generator, device=generator.device).cpu()
        return NoiseDraw(noise, pool[pick].to(device))

    def errors(self, pipe, model, latents, condition, prompt_embeds, draw, frame_weights=None) -> torch.Tensor:
        noise = draw.noise.to(latents.dtype)
        noisy = pipe.scheduler.add_noise(latents, noise, draw.timesteps)
        target = ddpm_target(pipe.scheduler, latents, noise, draw.timesteps)
        dtype = model.dtype
        hidden = torch.cat([noisy, condition["image"]], dim=2).to(dtype)
        prediction = model(hidden_states=hidden, encoder_hidden_states=prompt_embeds.to(dtype),
                           timestep=draw.timesteps, image_rotary_emb=self.rotary(pipe, latents),
                           return_dict=False)[0]
        weight = None if frame_weights is None else frame_weights.view(1, -1, 1, 1, 1).to(latents.device)
        return masked_error(prediction, target, weight)

    def warm_start_loss(self, pipe, clips: np.ndarray, prompts: list[str], first_frame_weight: float,
                        text_length: int) -> torch.Tensor:
        """The tiny model's denoising loss on clean clips (uint8 [B, F, H, W, 3]); draws from torch's global RNG.
        The prompt length is the transformer's (``text_length`` is the same value for this family)."""
        from anisora_ray.models.tiny_warmstart import to_video_tensor

        vae, transformer, scheduler = pipe.vae, pipe.transformer, pipe.scheduler
        batch = clips.shape[0]
        with torch.no_grad():
            latents = scale_latents(vae, vae.encode(to_video_tensor(clips)).latent_dist.mode()).permute(0, 2, 1, 3, 4)
            # the image condition is a posterior sample, as the pipeline draws it
            first = scale_latents(vae, vae.encode(to_video_tensor(clips[:, :1])).latent_dist.sample()).permute(0, 2, 1, 3, 4)
            image = torch.cat([first, first.new_zeros((batch, latents.shape[1] - 1, *first.shape[2:]))], dim=1)
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                           max_sequence_length=transformer.config.max_text_seq_length, device="cpu")
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        prediction = transformer(hidden_states=torch.cat([noisy, image], dim=2), encoder_hidden_states=embeds,
                                 timestep=t, image_rotary_emb=self.rotary(pipe, latents), return_dict=False)[0]
        weight = torch.ones(latents.shape[1])
        weight[0] = first_frame_weight  # an image-to-video model's first frame is its image
        return ((prediction - target) ** 2).mean(dim=(0, 2, 3, 4)).mul(weight).sum() / weight.sum()

    @staticmethod
    def rotary(pipe, latents: torch.Tensor):
        """The transformer's rotary position embeddings for the latents' geometry (None when it uses none)."""
        config = pipe.transformer.config
        if not config.use_rotary_positional_embeddings:
            return None
        frames, h, w = latents.shape[1], latents.shape[3], latents.shape[4]
        key = (frames, h, w, str(latents.device))
        cache = pipe.__dict__.setdefault("_anisora_rotary", {})
        if key not in cache:
            s = pipe.vae_scale_factor_spatial
            cache[key] = pipe._prepare_rotary_positional_embeddings(h * s, w * s, frames, latents.device)
        return cache[key]


@torch.no_grad()
def encode_videos(pipe, frames: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] → scaled VAE latents [B, F', C, h, w] (the posterior mode: deterministic)."""
    device, dtype = pipe.vae.device, pipe.vae.dtype
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 4, 1, 2, 3).to(dtype) / 127.5 - 1.0
    latents = pipe.vae.encode(x).latent_dist.mode()  # [B, C, F', h, w]
    return scale_latents(pipe.vae, latents).permute(0, 2, 1, 3, 4).contiguous()


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
    latents = scale_latents(vae, torch.cat(drawn).to(dtype).permute(0, 2, 1, 3, 4), pipe.vae_scaling_factor_image)
    latents = torch.cat([latents, latents.new_zeros((latents.shape[0], latent_frames - 1, *latents.shape[2:]))], dim=1)
    if patch_size_t is not None:  # CogVideoX 1.5: the first frame is repeated to fill a temporal patch
        latents = torch.cat([latents[:, : latents.shape[1] % patch_size_t], latents], dim=1)
    return latents
