"""What the released-checkpoint converters and scorers share: safe unpickling, strict key checks,
the converted folder format, and the released pre-processing (PIL resize, CLIP statistics).

A converted scorer is a folder: ``model.safetensors`` (names of the transformers-based module),
``config.json`` (``{"family": ..., ...}``: everything needed to rebuild the module) and, where a
tokenizer is needed, ``tokenizer/``. Scoring loads only safetensors; released pickles are read once,
at conversion, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from anisora_ray.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(ConfigError):
    """A released checkpoint that is missing, unreadable, or lacks / misshapes a key."""


def safe_globals() -> list:
    """What the released pickles may hold besides tensors: numpy scalars and arrays (mmengine meta)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    return [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *(type(np.dtype(t)) for t in
            ("float64", "float32", "int64", "int32", "bool"))]


def load_pickle(path: str, key: str | None) -> dict[str, torch.Tensor]:
    """The state dict under ``key`` of a released ``.pth`` (``torch.load(weights_only=True)`` with the
    allowlist above); a file needing anything else is refused, naming the file and the global."""
    if not os.path.isfile(path):
        raise CheckpointError(f"released checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types
        raise CheckpointError(f"{path} cannot be loaded with weights_only=True ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}); re-save its state dict alone with torch.save") from exc
    state = payload.get(key, payload) if key and isinstance(payload, Mapping) else payload
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: no state dict of tensors under {key!r} (keys: {list(payload)[:8]})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def expect(state: Mapping[str, torch.Tensor], key: str, shape: tuple | None = None, where: str = "") -> torch.Tensor:
    """``state[key]``, or an error naming the key (and its expected and found shape)."""
    if key not in state:
        raise CheckpointError(f"{where}: key {key!r} is missing from the released checkpoint")
    value = state[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{where}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def load_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """Load every parameter and persistent buffer of ``module`` from ``tensors``; any missing,
    unexpected or misshapen key is an error naming it (the released loader silently dropped them)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
                              f"misshapen {wrong[:5]}")
    module.load_state_dict(dict(tensors), strict=True)
    return module


def write_converted(out_dir: str, config: dict, tensors: Mapping[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return out_dir


def read_converted(path: str, family: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(path, WEIGHTS)):
        raise CheckpointError(f"{path} is not a converted reward folder ({CONFIG} + {WEIGHTS}); "
                              "make one with `anisora-ray convert-reward`")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("family") != family:
        raise CheckpointError(f"{path} holds a {config.get('family')!r} scorer, not {family!r}")
    return config, load_file(os.path.join(path, WEIGHTS))


def released_pixels(images, size: int, device, dtype=torch.float32, mean=CLIP_MEAN, std=CLIP_STD,
                    resample: str = "bicubic") -> torch.Tensor:
    """uint8 [H, W, 3] images → [N, 3, size, size] as the released ``transforms.Resize((s, s))`` on PIL
    images (a squash, no crop), ``ToTensor`` and ``Normalize``."""
    from PIL import Image

    method = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[resample]
    arrays = [np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize((size, size), method)) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255.0)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).to(device=device, dtype=dtype)
