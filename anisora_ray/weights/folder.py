"""Trained-weights folders in storage: written shard by shard, read shard by shard, with a manifest.

A folder is what a refresh loads and what the next round starts from:

- full transformer: ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or numbered
  shards with diffusers' ``.index.json``, so ``from_pretrained`` reads it too);
- LoRA adapter: ``pytorch_lora_weights.safetensors`` and ``lora_config.json`` (see :mod:`.lora`);
- ``weights_manifest.json``: kind, checksum, bytes and tensor count of what was written.

Tensors are read one file at a time (memory-mapped for local folders), so neither a writer nor a
reader ever holds more than one shard. The checksum covers the tensors in read order: files in
sorted order, names sorted within a file (a writer that emits sorted names into sequential shards
writes exactly that order).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import torch

from anisora_ray.errors import WeightsError
from anisora_ray.io import fs
from anisora_ray.weights.state import Checksum, refuse_non_finite

MANIFEST = "weights_manifest.json"
FULL_NAME = "diffusion_pytorch_model"


def safetensors_files(uri: str) -> list[str]:
    """The ``*.safetensors`` files of a folder, sorted; a clear error when there are none."""
    filesystem, path = fs.url_to_fs(uri)
    try:
        names = sorted(p for p in filesystem.ls(path, detail=False) if p.endswith(".safetensors"))
    except FileNotFoundError:
        raise WeightsError(f"weights folder {uri} does not exist") from None
    if not names:
        raise WeightsError(f"no .safetensors file in {uri}")
    return [fs.join(uri, os.path.basename(n)) for n in names]


def _read_file(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from safetensors.torch import load

    try:
        if not fs.is_url(file):  # memory-mapped: one tensor at a time
            with safe_open(file, framework="pt") as handle:
                for name in sorted(handle.keys()):
                    yield name, handle.get_tensor(name)
            return
        tensors = load(fs.read_bytes(file))
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise WeightsError(f"cannot read weights file {file}: {exc}") from None
    for name in sorted(tensors):
        yield name, tensors.pop(name)


def read_safetensors(uri: str, strip_prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every safetensors file in a folder, file by file (never a pickle)."""
    for file in safetensors_files(uri):
        for name, tensor in _read_file(file):
            yield name.removeprefix(strip_prefix), tensor


def read_manifest(uri: str) -> dict | None:
    """The folder's manifest (None for a folder written by something else)."""
    try:
        return json.loads(fs.read_bytes(fs.join(uri, MANIFEST)))
    except FileNotFoundError:
        return None


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [f"{FULL_NAME}.safetensors"]
    return [f"{FULL_NAME}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


class FolderWriter:
    """Writes shards as they come (``write_shard``) and the manifest last (``close``).

    ``kind`` is ``full`` (``num_shards`` numbered shards) or ``lora`` (one adapter file, ``prefix``
    put before every name as diffusers' LoRA format wants).
    """

    def __init__(self, uri: str, kind: str, num_shards: int = 1, prefix: str = "", file_name: str | None = None,
                 fingerprint: bool = False):
        if kind not in ("full", "lora"):
            raise ValueError(f"kind {kind!r}: expected 'full' or 'lora'")
        self.uri, self.kind, self.prefix = uri, kind, prefix
        self.names = [file_name] if file_name else shard_names(num_shards)
        self.checksum, self.num_bytes, self.num_tensors, self.weight_map = Checksum(), 0, 0, {}
        self.checksum_fp = Checksum("fp") if fingerprint else None  # what GPU routes verify with
        self._written = 0
        self._last = ""

    def write_shard(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from safetensors.torch import save

        if self._written >= len(self.names):
            raise WeightsError(f"{self.uri}: more shards than the {len(self.names)} planned")
        file = self.names[self._written]
        shard = {}
        for name, tensor in sorted(tensors, key=lambda nt: nt[0]):
            if name <= self._last:
                raise WeightsError(f"{self.uri}: tensor {name!r} out of order (shards must hold sorted names)")
            self._last = name
            full = self.prefix + name
            refuse_non_finite(name, tensor, self.uri)
            tensor = tensor.detach().contiguous()
            self.checksum.update(name, tensor)  # names as a reader yields them (prefix stripped)
            if self.checksum_fp is not None:
                self.checksum_fp.update(name, tensor)
            self.num_bytes += tensor.numel() * tensor.element_size()
            self.num_tensors += 1
            self.weight_map[full] = file
            shard[full] = tensor
        fs.write_bytes(fs.join(self.uri, file), save(shard, metadata={"format": "pt"}))
        self._written += 1

    def close(self, extra: dict | None = None) -> dict:
        if self._written != len(self.names):
            raise WeightsError(f"{self.uri}: {self._written} of {len(self.names)} shard(s) written")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.num_bytes}, "weight_map": self.weight_map}
            fs.write_bytes(fs.join(self.uri, f"{FULL_NAME}.safetensors.index.json"), json.dumps(index, indent=1).encode())
        manifest = {"kind": self.kind, "checksum": self.checksum.hexdigest(), "num_bytes": self.num_bytes,
                    "num_tensors": self.num_tensors, "files": self.names, **(extra or {})}
        if self.checksum_fp is not None:
            manifest["checksum_fp"] = self.checksum_fp.hexdigest()
        fs.write_bytes(fs.join(self.uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True).encode())
        return manifest

