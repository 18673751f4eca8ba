"""Wan-format transformer weights (AniSora V2/V3 releases) into a diffusers ``WanImageToVideoPipeline`` folder.

AniSora's Wan checkpoints are released in Wan's original layout: ``WanModel`` parameter names, one folder (or file)
per expert, e.g. V3.2's ``high_noise_model/`` and ``low_noise_model/``. :func:`convert_wan` renames each with
diffusers' own mapping (``convert_wan_transformer_to_diffusers``, what ``from_single_file`` uses), loads it strictly
into the transformer of the matching ``Wan-AI/*-Diffusers`` folder (every parameter present, every shape right, or
an error naming the source), and writes a folder that ``model.pretrained`` loads: the converted ``transformer/``
(and ``transformer_2/``) beside the base folder's VAE, text and image encoders, tokenizer and scheduler.

Diffusers' A14B pipeline calls ``transformer`` at t ≥ boundary (the high-noise expert) and ``transformer_2`` below,
so the sources are given in that order: high-noise first.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import time

import torch

from anisora_ray.errors import ConfigError
from anisora_ray.models.families import DTYPES

EXPERTS = ("transformer", "transformer_2")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def weight_files(source: str) -> list[str]:
    """The weight files of ``source``: itself, or a folder's safetensors shards (else its .pt / .pth / .bin)."""
    if os.path.isfile(source):
        if not source.endswith(WEIGHT_SUFFIXES):
            raise ConfigError(f"{source}: not a weights file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
        return [source]
    if not os.path.isdir(source):
        raise ConfigError(f"{source}: no such file or folder")
    for pattern in ("*.safetensors", "*.pt", "*.pth", "*.bin"):
        found = sorted(glob.glob(os.path.join(source, pattern)))
        if found:
            return found
    raise ConfigError(f"{source}: no weights in it (*.safetensors, *.pt, *.pth or *.bin)")


def read_wan_state(source: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of ``source`` cast to ``dtype`` as it is read (safetensors lazily; others ``weights_only``)."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(source):
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as f:
                parts = {k: f.get_tensor(k).to(dtype) for k in f.keys()}
        else:
            try:  # mapped, not read whole (torch.save's zip format); the legacy format is read
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            loaded = loaded.get("state_dict", loaded.get("module", loaded)) if isinstance(loaded, dict) else loaded
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a state dict, found {type(loaded).__name__}")
            parts = {k: v.to(dtype) for k, v in loaded.items() if isinstance(v, torch.Tensor)}
        repeated = sorted(state.keys() & parts.keys())
        if repeated:
            raise ConfigError(f"{path}: repeats {len(repeated)} tensors of another file of {source} (e.g. {repeated[0]})")
        state.update(parts)
    return state


def base_experts(base: str) -> list[str]:
    """The denoisers a diffusers Wan folder has (``transformer``, and ``transformer_2`` for two experts)."""
    try:
        with open(os.path.join(base, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--base {base}: not a diffusers pipeline folder ({exc})") from None
    if index.get("_class_name") != "WanImageToVideoPipeline":
        raise ConfigError(f"--base {base}: a {index.get('_class_name')!r} folder, expected WanImageToVideoPipeline")
    return [name for name in EXPERTS if (index.get(name) or [None])[0] is not None]


def convert_transformer(source: str, base: str, name: str, dtype: torch.dtype):
    """The ``name`` transformer of ``base`` with ``source``'s weights, loaded strictly."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers(read_wan_state(source, dtype))
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(base, subfolder=name))
    expected = model.state_dict().keys()
    missing, unexpected = sorted(expected - converted.keys()), sorted(converted.keys() - expected)
    if missing or unexpected:
        raise ConfigError(f"{source}: not the weights of {base}/{name}: {len(missing)} parameters missing "
                          f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]} (after Wan -> diffusers renaming)")
    try:
        model.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:  # a shape of another structure (e.g. 5B weights into a 14B config)
        raise ConfigError(f"{source}: does not fit {base}/{name}: {str(exc)[:600]}") from None
    return model.to(dtype).eval()


def convert_wan(base: str, sources: list[str], out: str, dtype: str = "bfloat16", link: bool = True,
                max_shard_size: str = "5GB", progress=print) -> dict:
    """Write ``out``: ``sources`` (Wan format, one per expert, high-noise first) as the diffusers transformer(s) of
    the local Wan folder ``base``, the rest of ``base`` symlinked (``link``) or copied. Returns what was written.
    The folder is built as ``<out>.partial`` and renamed once complete: a failed conversion leaves no ``out``."""
    names = base_experts(base)
    if len(sources) != len(names):
        raise ConfigError(f"--base {base} has {len(names)} denoiser(s) ({', '.join(names)}); got {len(sources)} "
                          f"source(s): give one per expert, high-noise first")
    if os.path.exists(out) and os.listdir(out):
        raise ConfigError(f"--out {out} exists and is not empty")
    final, out = out, os.path.normpath(out) + ".partial"
    shutil.rmtree(out, ignore_errors=True)  # what an interrupted conversion left
    os.makedirs(out)
    report = {"base": os.path.abspath(base), "dtype": dtype, "experts": {}}
    for name, source in zip(names, sources, strict=True):
        began = time.perf_counter()
        model = convert_transformer(source, base, name, DTYPES[dtype])
        model.save_pretrained(os.path.join(out, name), safe_serialization=True, max_shard_size=max_shard_size)
        count = sum(p.numel() for p in model.parameters())
        report["experts"][name] = {"source": os.path.abspath(source), "parameters": count,
                                   "seconds": round(time.perf_counter() - began, 2)}
        progress(f"{name}: {count / 1e9:.2f} B parameters from {source} -> {os.path.join(final, name)}")
        del model
    for entry in sorted(os.listdir(base)):  # VAE, encoders, tokenizer, scheduler, model_index.json
        if entry in EXPERTS or entry.startswith("."):
            continue
        src, dst = os.path.abspath(os.path.join(base, entry)), os.path.join(out, entry)
        if link:
            os.symlink(src, dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    with open(os.path.join(out, "anisora_conversion.json"), "w") as f:
        json.dump(report, f, indent=2)
    if os.path.isdir(final):  # an empty folder made beforehand
        os.rmdir(final)
    os.rename(out, final)
    return report
