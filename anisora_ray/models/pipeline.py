"""Load the image-to-video pipeline of ``model.family``: a Hugging Face id, a local folder, or the cached tiny model."""

from __future__ import annotations

import os

from anisora_ray.config import GeneratorConfig, ModelConfig
from anisora_ray.errors import ConfigError
from anisora_ray.models.families import DTYPES, get_family, pick_device

__all__ = ["DTYPES", "check_pretrained", "load_i2v_pipeline", "pick_device", "resolve_pretrained"]


def check_pretrained(model: ModelConfig) -> None:
    """A ``model.pretrained`` written as a path (absolute, ``./``, ``../``, ``~`` or deeper than a Hub id's
    ``org/name``) must be a folder here: said before anything starts, not as a Hub lookup of a path."""
    name = model.pretrained
    if name == "tiny" or not (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1):
        return
    folder = os.path.expanduser(name)
    if not os.path.isdir(folder):
        raise ConfigError(f"model.pretrained = {name!r} is not a folder on this machine: give a diffusers pipeline folder "
                          "(AniSora V2/V3's Wan-format release: convert it with `anisora-ray convert-wan`, "
                          "docs/alignment.md) or a Hugging Face id such as THUDM/CogVideoX-5b-I2V")
    index = os.path.join(folder, "model_index.json")
    lost = ["model_index.json"] if os.path.islink(index) and not os.path.exists(index) else []
    if not lost and not os.path.isfile(index):
        raise ConfigError(f"model.pretrained = {name!r} has no model_index.json: not a diffusers pipeline folder")
    if not lost:
        import json

        with open(index) as f:
            components = [k for k, v in json.load(f).items() if isinstance(v, list) and v and v[0] is not None]
        # a link whose target is not there: a folder converted with links into one machine's Hugging Face cache
        lost = [c for c in components
                if os.path.lexists(os.path.join(folder, c)) and not os.path.exists(os.path.join(folder, c))]
    if lost:
        raise ConfigError(f"model.pretrained = {name!r}: {lost} are links to nothing here (converted on another machine "
                          "with links into its cache?): convert it again with `anisora-ray convert-wan --copy`")


def resolve_pretrained(model: ModelConfig, generator: GeneratorConfig) -> str:
    """The ``from_pretrained`` argument for this config; builds and caches the tiny model on first use."""
    if model.pretrained != "tiny":
        check_pretrained(model)
        return model.pretrained
    return get_family(model.family).tiny_folder(model, generator)


def load_i2v_pipeline(pretrained: str, dtype: str = "float32", device: str = "auto", revision: str | None = None,
                      family: str = "cogvideox_i2v"):
    """The family's pipeline ``from_pretrained`` (safetensors only), every part, in eval mode on ``device``."""
    return get_family(family).load(pretrained, dtype, device, revision, "all")
