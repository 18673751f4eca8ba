"""The replica side of a weight refresh (no Ray): what travels with an update, and loading it.

An update reaches a replica either as object-store buckets (pushed by a trainer) or as a folder
in storage that the replica streams itself (:func:`folder_update`); either way the driver only
handles the :class:`UpdateMeta`: version, kind, checksum, never the tensors.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from anisora_ray.config import LoraConfig
from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.folder import read_manifest, read_safetensors
from anisora_ray.weights.state import TensorCopier


@dataclass(frozen=True)
class UpdateMeta:
    """What travels with the buckets: the version record, and the adapter's shape for LoRA."""

    version: WeightsVersion
    lora: dict | None = None


def base_targets(transformer) -> dict:
    """The transformer's own tensors under their plain names, also when peft wraps layers for an adapter."""
    return {k.replace(".base_layer.", "."): v for k, v in transformer.state_dict().items() if ".lora_" not in k}


def copier_for(transformer, kind: str, lora: LoraConfig | None, scheme: str = "xxh3") -> TensorCopier:
    """A copier into a whole transformer (``full``) or into a LoRA adapter, added and enabled for ``lora``."""
    if kind == "lora":
        lora_io.add_adapter(transformer, lora)
        transformer.enable_adapters()
        return TensorCopier(lora_io.adapter_targets(transformer), scheme)
    return TensorCopier(base_targets(transformer), scheme)


def settle(transformer, kind: str) -> None:
    """After ``full`` weights the adapter (if any) is switched off: they replace base + adapter."""
    if kind == "full" and lora_io.has_adapter(transformer):
        transformer.disable_adapters()


class UpdateLoader:
    """Replica side of one update, loaded part by part: ``add`` tensors as buckets arrive, ``finish``
    with the version record once the sender knows the checksum. Until then the transformer may hold a
    mix of old and new weights (:attr:`partial`): the replica must not generate with it."""

    def __init__(self, transformer, version: int, kind: str, lora: dict | None, current_version: int,
                 scheme: str = "xxh3"):
        if version <= current_version:
            raise WeightsError(f"weights version {version} is not newer than the loaded version {current_version}")
        self.version, self.kind, self.start = version, kind, time.perf_counter()
        self.transformer = transformer
        self.copier = copier_for(transformer, kind, LoraConfig.model_validate(lora) if kind == "lora" else None, scheme)
        self.partial = False
        self.base_mixed = False  # the base holds part of a full update that did not commit (only a full one repairs it)

    def add(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.partial = True
        self.copier.add(tensors)

    def finish(self, record: WeightsVersion) -> dict:
        """Verify the whole update against ``record`` (version, kind, checksum); returns the load report.
        A record without a checksum (a folder written by another tool) is checked only by the caller's
        comparison of the replicas' reports."""
        if (record.version, record.kind) != (self.version, self.kind):
            raise WeightsError(f"update finished as version {record.version} ({record.kind}) but began as "
                               f"{self.version} ({self.kind})")
        report = self.copier.report(require_all=True)
        if record.checksum and report["received"] != record.checksum:
            raise WeightsError(f"weights version {record.version}: received checksum {report['received'][:12]} != "
                               f"published {record.checksum[:12]} (transfer corrupted or wrong update)")
        settle(self.transformer, self.kind)
        self.partial = False
        return {**report, "version": record.version, "kind": record.kind, "seconds": time.perf_counter() - self.start}


def load_update(transformer, meta: UpdateMeta, tensors: Iterable[tuple[str, torch.Tensor]], current_version: int) -> dict:
    """Replica side: copy the update's tensors into ``transformer`` and verify; returns the load report."""
    record = meta.version
    loader = UpdateLoader(transformer, record.version, record.kind, meta.lora, current_version)
    loader.add(tensors)
    return loader.finish(record)


def read_folder(uri: str) -> tuple[str, LoraConfig | None, Iterator[tuple[str, torch.Tensor]]]:
    """(kind, adapter config, named tensors) of a trained folder: a LoRA adapter or a whole transformer."""
    if lora_io.is_adapter_folder(uri):
        return "lora", lora_io.read_lora_config(uri), read_safetensors(uri, strip_prefix=lora_io.PREFIX)
    return "full", None, read_safetensors(uri)


def folder_update(uri: str, version: int) -> UpdateMeta:
    """The metadata of a trained folder as weights ``version`` (reads only its small json files)."""
    manifest = read_manifest(uri) or {}
    kind = manifest.get("kind") or ("lora" if lora_io.is_adapter_folder(uri) else "full")
    lora = lora_io.read_lora_config(uri).model_dump() if kind == "lora" else None
    record = WeightsVersion(version=version, kind=kind, uri=uri, checksum=manifest.get("checksum", ""),
                            num_bytes=int(manifest.get("num_bytes", 0)), num_tensors=int(manifest.get("num_tensors", 0)))
    return UpdateMeta(record, lora)


def load_folder(transformer, uri: str) -> dict:
    """Load a trained folder (full transformer or LoRA adapter, as ``publish`` reads) into ``transformer``."""
    kind, lora, tensors = read_folder(uri)
    copier = copier_for(transformer, kind, lora)
    copier.add(tensors)
    report = copier.report(require_all=True)
    settle(transformer, kind)
    return report
