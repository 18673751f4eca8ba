"""The replica side of a weight refresh (no Ray): what travels with the buckets, and loading it."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from anisora_ray.config import LoraConfig
from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.state import Bucket, bucket_tensors, copy_into, read_safetensors


@dataclass(frozen=True)
class UpdateMeta:
    """What travels with the buckets: the version record, and the adapter's shape for LoRA."""

    version: WeightsVersion
    lora: dict | None = None


def base_targets(transformer) -> dict:
    """The transformer's own tensors under their plain names, also when peft wraps layers for an adapter."""
    return {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if ".lora_" not in k}


def copy_weights(transformer, kind: str, lora: LoraConfig | None, tensors) -> dict:
    """Copy a whole transformer's (``full``) or a LoRA adapter's tensors into ``transformer``: the
    adapter is added and enabled for ``lora``, and switched off after ``full`` weights (they replace base + adapter)."""
    if kind == "lora":
        lora_io.add_adapter(transformer, lora)
        transformer.enable_adapters()
        return copy_into(lora_io.adapter_targets(transformer), tensors, require_all=True)
    report = copy_into(base_targets(transformer), tensors, require_all=True)
    if lora_io.has_adapter(transformer):
        transformer.disable_adapters()
    return report


def load_update(transformer, meta: UpdateMeta, buckets: Iterable[Bucket], current_version: int) -> dict:
    """Replica side: copy the buckets into ``transformer`` and verify; returns the load report."""
    record = meta.version
    if record.version <= current_version:
        raise WeightsError(f"weights version {record.version} is not newer than the loaded version {current_version}")
    start = time.perf_counter()
    lora = LoraConfig.model_validate(meta.lora) if record.kind == "lora" else None
    report = copy_weights(transformer, record.kind, lora, bucket_tensors(buckets))
    if report["received"] != record.checksum:
        raise WeightsError(f"weights version {record.version}: received checksum {report['received'][:12]} != "
                           f"published {record.checksum[:12]} (transfer corrupted or wrong update)")
    return {**report, "version": record.version, "kind": record.kind, "seconds": time.perf_counter() - start}


def read_folder(uri: str) -> tuple[str, LoraConfig | None, Iterator[tuple[str, torch.Tensor]]]:
    """(kind, adapter config, named tensors) of a trained folder: a LoRA adapter or a whole transformer."""
    if lora_io.is_adapter_folder(uri):
        return "lora", lora_io.read_lora_config(uri), read_safetensors(uri, strip_prefix=lora_io.PREFIX)
    return "full", None, read_safetensors(uri)


def load_folder(transformer, uri: str) -> dict:
    """Load a trained folder (full transformer or LoRA adapter, as ``publish`` reads) into ``transformer``."""
    return copy_weights(transformer, *read_folder(uri))
