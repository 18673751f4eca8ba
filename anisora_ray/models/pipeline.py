"""Load the image-to-video pipeline: a Hugging Face id, a local folder, or the cached tiny model."""

from __future__ import annotations

import os

import torch

from anisora_ray.config import GeneratorConfig, ModelConfig
from anisora_ray.models.tiny import save_tiny_i2v_pipeline, tiny_fingerprint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_pretrained(model: ModelConfig, generator: GeneratorConfig) -> str:
    """The ``from_pretrained`` argument for this config; builds and caches the tiny model on first use."""
    if model.pretrained != "tiny":
        return model.pretrained
    key = tiny_fingerprint(model.tiny, generator.height, generator.width, generator.num_frames)
    path = os.path.join(os.path.expanduser(model.cache_dir), f"tiny-cogvideox-i2v-{key}")
    return save_tiny_i2v_pipeline(model.tiny, generator.height, generator.width, generator.num_frames, path)


def scale_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE posterior latents → the transformer's latent space (CogVideoX scales; some VAEs invert the factor)."""
    factor = vae.config.scaling_factor
    return latents / factor if vae.config.get("invert_scale_latents", False) else latents * factor


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_i2v_pipeline(pretrained: str, dtype: str = "float32", device: str = "auto", revision: str | None = None):
    """``CogVideoXImageToVideoPipeline.from_pretrained`` in eval mode on ``device``; weights from safetensors."""
    import diffusers
    import transformers
    from diffusers import CogVideoXImageToVideoPipeline

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(
        pretrained, dtype=DTYPES[dtype], revision=revision, use_safetensors=True
    )
    pipe.to(pick_device(device))
    for name in ("transformer", "vae", "text_encoder"):
        getattr(pipe, name).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
