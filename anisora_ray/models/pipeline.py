"""Load the image-to-video pipeline of ``model.family``: a Hugging Face id, a local folder, or the cached tiny model."""

from __future__ import annotations

from anisora_ray.config import GeneratorConfig, ModelConfig
from anisora_ray.models.families import DTYPES, get_family, pick_device

__all__ = ["DTYPES", "load_i2v_pipeline", "pick_device", "resolve_pretrained"]


def resolve_pretrained(model: ModelConfig, generator: GeneratorConfig) -> str:
    """The ``from_pretrained`` argument for this config; builds and caches the tiny model on first use."""
    if model.pretrained != "tiny":
        return model.pretrained
    return get_family(model.family).tiny_folder(model, generator)


def load_i2v_pipeline(pretrained: str, dtype: str = "float32", device: str = "auto", revision: str | None = None,
                      family: str = "cogvideox_i2v"):
    """The family's pipeline ``from_pretrained`` (safetensors only), every part, in eval mode on ``device``."""
    return get_family(family).load(pretrained, dtype, device, revision, "all")
