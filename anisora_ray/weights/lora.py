"""LoRA adapters on the generator's transformer through peft (diffusers' ``add_adapter`` API).

One adapter, named ``gapo``, is trained and refreshed; disabling it gives back the base model,
which is the frozen reference of LoRA GAPO. On disk an adapter is diffusers' LoRA format
(``pytorch_lora_weights.safetensors`` with ``transformer.`` keys, loadable with
``pipe.load_lora_weights``) plus ``lora_config.json`` with its rank, alpha and targets.
"""

from __future__ import annotations

import json

import torch

from anisora_ray.config import LoraConfig
from anisora_ray.errors import WeightsError
from anisora_ray.io import fs

ADAPTER = "gapo"
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
CONFIG_NAME = "lora_config.json"
PREFIX = "transformer."


def has_adapter(transformer) -> bool:
    return ADAPTER in (getattr(transformer, "peft_config", None) or {})


def add_adapter(transformer, lora: LoraConfig) -> None:
    """Add the ``gapo`` adapter (B initialised to zero: the model's output is unchanged) if absent."""
    from peft import LoraConfig as PeftLoraConfig

    if has_adapter(transformer):
        return
    transformer.add_adapter(
        PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                       target_modules=list(lora.target_modules), init_lora_weights=True),
        adapter_name=ADAPTER,
    )


def adapter_state(transformer) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed without the adapter name (views of the parameters)."""
    from peft.utils import get_peft_model_state_dict

    if not has_adapter(transformer):
        raise WeightsError("the transformer has no 'gapo' LoRA adapter")
    return get_peft_model_state_dict(transformer, adapter_name=ADAPTER)


def adapter_parameters(transformer) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters under the names of :func:`adapter_state` (partitioned or not)."""
    params = dict(transformer.named_parameters())
    found = {}
    for name in adapter_state(transformer):
        stem, _, leaf = name.rpartition(".")
        found[name] = params[f"{stem}.{ADAPTER}.{leaf}"]
    return found


def adapter_targets(transformer) -> dict[str, torch.Tensor]:
    """Views of the adapter's parameters under the names of :func:`adapter_state` (to copy into)."""
    return {name: param.data for name, param in adapter_parameters(transformer).items()}


def write_lora_config(lora: LoraConfig, uri: str) -> None:
    fs.write_bytes(fs.join(uri, CONFIG_NAME), json.dumps(lora.model_dump(), indent=2).encode())


def save_adapter(transformer, lora: LoraConfig, uri: str) -> None:
    from safetensors.torch import save

    state = {PREFIX + k: v.detach().cpu().contiguous() for k, v in adapter_state(transformer).items()}
    fs.write_bytes(fs.join(uri, WEIGHTS_NAME), save(state))
    write_lora_config(lora, uri)


def read_lora_config(uri: str) -> LoraConfig:
    try:
        return LoraConfig.model_validate_json(fs.read_bytes(fs.join(uri, CONFIG_NAME)))
    except FileNotFoundError:
        raise WeightsError(f"{uri} has no {CONFIG_NAME}: not a LoRA adapter folder written by anisora-ray") from None


def is_adapter_folder(uri: str) -> bool:
    return fs.exists(fs.join(uri, CONFIG_NAME))
