"""FP8 rollouts (``generator.quantize: fp8``): torchao float8 on the denoisers' block linears.

Dynamic float8 activations and float8 weights scaled per row (torchao's
``Float8DynamicActivationFloat8WeightConfig(PerRow())``) on every ``nn.Linear`` inside the repeated transformer
blocks (the bulk of a step's matrix work; embeddings and the output projection stay in the model's dtype), on a
GPU with FP8 tensor cores (compute capability 8.9 or more: Ada, Hopper, Blackwell). Checked when the replica
starts: elsewhere, or without torchao, a ``ConfigError`` names the setting.

A weights refresh must land in the quantized replica. A LoRA update goes into the adapter, which peft adds
beside the FP8 base layers in the model's dtype: nothing to re-quantize. A full update is copied into the
plain weights: the block linears are dequantized first (:func:`dequantize_fp8`), the update is copied and
verified as for any replica, then :func:`quantize_fp8` quantizes them again and checks that every layer's FP8
weight dequantizes to the weights just loaded (within FP8's rounding), so a stale or half-quantized replica
is a ``WeightsError``, not silently different rollouts.
"""

from __future__ import annotations

import torch

from anisora_ray.errors import ConfigError, WeightsError
from anisora_ray.models.compile import repeated_blocks

MIN_CAPABILITY = (8, 9)
MAX_RELATIVE_ERROR = 0.1  # e4m3 keeps 3 mantissa bits: per-element error <= 2^-4; a layer's norm-relative ~0.02-0.03


def check_fp8(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse ``generator.quantize: fp8`` where it cannot run: not a CUDA device, no FP8 tensor cores, weights
    not in bfloat16 (per-row scales need it), no torchao."""
    if device.type != "cuda":
        raise ConfigError(f"generator.quantize='fp8' needs a CUDA GPU with FP8 tensor cores (compute capability "
                          f">= 8.9: Ada, Hopper, Blackwell); this replica runs on {device}. Use quantize: none there")
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise ConfigError(f"generator.quantize='fp8' needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} "
                          f"has {capability[0]}.{capability[1]} (no FP8 tensor cores). Use quantize: none")
    if dtype != torch.bfloat16:
        raise ConfigError(f"generator.quantize='fp8' quantizes bfloat16 weights (per-row scales); model.dtype is "
                          f"{str(dtype).removeprefix('torch.')}: set model.dtype: bfloat16")
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        raise ConfigError("generator.quantize='fp8' needs torchao: pip install 'anisora-ray[fp8]'") from exc


def is_quantized(weight: torch.Tensor) -> bool:
    """A torchao tensor subclass in place of a plain weight."""
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def block_linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    """The linears FP8 applies to: inside the repeated blocks, not a LoRA adapter's, both sides multiples of 16
    (what the FP8 matrix kernels take)."""
    found = []
    for block in repeated_blocks(module):
        for name, layer in block.named_modules():
            if type(layer) is torch.nn.Linear and ".lora_" not in f".{name}" \
                    and layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
                found.append(layer)
    return found


def quantize_fp8(module: torch.nn.Module) -> int:
    """Quantize every block linear that holds plain weights, verifying each against the weights it replaces;
    returns how many layers are FP8 afterwards."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    layers = block_linears(module)
    for layer in layers:
        if is_quantized(layer.weight):
            continue
        plain = layer.weight.detach().clone()
        quantize_(layer, config)
        error = (layer.weight.dequantize().float() - plain.float()).norm() / plain.float().norm().clamp_min(1e-12)
        if not torch.isfinite(error) or error > MAX_RELATIVE_ERROR:
            raise WeightsError(f"FP8 weight of a {tuple(plain.shape)} linear in {type(module).__name__} dequantizes "
                               f"{float(error):.3f} away from the weights it replaces (limit {MAX_RELATIVE_ERROR})")
    return sum(is_quantized(layer.weight) for layer in layers)


def dequantize_fp8(module: torch.nn.Module) -> int:
    """Give every FP8 block linear a plain weight again (its dequantized value), so a full update can be copied
    in; returns how many."""
    count = 0
    for layer in block_linears(module):
        if is_quantized(layer.weight):
            layer.weight = torch.nn.Parameter(layer.weight.dequantize(), requires_grad=False)
            count += 1
    return count
