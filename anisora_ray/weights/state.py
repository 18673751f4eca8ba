"""Named tensors on the wire: checksums, buckets and safetensors folders (no Ray here).

A bucket is one contiguous ``uint8`` buffer plus a manifest of the tensors packed in it, so a
model travels through the object store as a few large zero-copy numpy buffers rather than
thousands of small pickled tensors. The checksum covers names, dtypes, shapes and bytes, in
the order the tensors are sent.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from anisora_ray.errors import WeightsError


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # e.g. "float32"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    entries: tuple[TensorEntry, ...]
    data: np.ndarray  # uint8, 1-D

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 numpy view (a CPU copy first when it lives elsewhere)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


class Checksum:
    """sha256 over per-tensor XXH3-128 digests of (name, dtype, shape, bytes), in the order given.

    XXH3 (~30 GB/s a core) detects corrupted, truncated, mixed-up or stale transfers; it is not a
    defence against an adversary who can write to the object store (nothing here is).
    """

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    @staticmethod
    def of(name: str, tensor: torch.Tensor) -> bytes:
        h = xxhash.xxh3_128(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        h.update(memoryview(raw_bytes(tensor)))
        return h.digest()

    def add(self, digest: bytes) -> None:
        self._h.update(digest)

    def update(self, name: str, tensor: torch.Tensor) -> bytes:
        digest = self.of(name, tensor)
        self.add(digest)
        return digest

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def tensors_checksum(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    checksum = Checksum()
    for name, tensor in tensors:
        checksum.update(name, tensor)
    return checksum.hexdigest()


def nbytes_of(tensor: torch.Tensor) -> int:
    """Bytes of the whole tensor (a ZeRO-3 partition counts at its full, gathered size)."""
    numel = getattr(tensor, "ds_numel", None)
    return int(numel if numel is not None else tensor.numel()) * tensor.element_size()


def group_by_size(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive runs of ``tensors`` of about ``bucket_bytes`` each (a larger tensor gets its own)."""
    pending: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in tensors:
        nbytes = nbytes_of(tensor)
        if pending and size + nbytes > bucket_bytes:
            yield pending
            pending, size = [], 0
        pending.append((name, tensor))
        size += nbytes
    if pending:
        yield pending


def refuse_non_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    """Raise :class:`WeightsError` for a floating tensor holding NaN or inf (they propagate into the sum)."""
    if tensor.is_floating_point() and not bool(torch.sum(tensor, dtype=torch.float64).isfinite()):
        raise WeightsError(f"{where}: tensor {name!r} has non-finite values; refusing to publish diverged weights")


def pack_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Pack tensors, in order, into buckets of about ``bucket_bytes`` (a larger tensor gets its own)."""
    for group in group_by_size(tensors, bucket_bytes):
        data = np.empty(sum(nbytes_of(t) for _, t in group), dtype=np.uint8)
        entries, offset = [], 0
        for name, tensor in group:
            raw = raw_bytes(tensor)
            data[offset : offset + raw.nbytes] = raw
            entries.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), offset, int(raw.nbytes)))
            offset += raw.nbytes
        yield Bucket(tuple(entries), data)


def unpack_bucket(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a bucket, as views of its buffer (read-only when it lives in the object store)."""
    for e in bucket.entries:
        with warnings.catch_warnings():  # object-store buffers are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(bucket.data[e.offset : e.offset + e.nbytes])
        yield e.name, raw.view(getattr(torch, e.dtype)).reshape(e.shape)


def bucket_tensors(buckets: Iterable[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in buckets:
        yield from unpack_bucket(bucket)


def _landed(name: str, target: torch.Tensor, cast: torch.Tensor, cast_digest: bytes) -> bool:
    """Whether ``target`` now holds ``cast`` bit for bit: its digest on the host (XXH3 outruns an
    elementwise compare there), a widest-word comparison on its own device elsewhere (no host copy)."""
    if target.device.type == "cpu":
        return Checksum.of(name, target) == cast_digest
    nbytes = target.numel() * target.element_size()
    word = next(dt for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.uint8, 1)) if nbytes % size == 0)
    flat = target.contiguous().reshape(-1).view(torch.uint8).view(word)
    return torch.equal(flat, cast.to(target.device).contiguous().reshape(-1).view(torch.uint8).view(word))


def copy_into(targets: Mapping[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]], *,
              require_all: bool) -> dict:
    """Copy named tensors into ``targets`` (views of a module's state) and verify what landed.

    Returns the checksum of what was received and of what was loaded (the received tensors in
    the targets' dtypes; each target is checked bit for bit against it after the copy). Unknown names or shapes, a copy that did not land, or (``require_all``) targets
    left without a tensor raise :class:`WeightsError`.
    """
    received, loaded, order, nbytes = Checksum(), Checksum(), [], 0
    with torch.no_grad():
        for name, tensor in tensors:
            target = targets.get(name)
            if target is None:
                raise WeightsError(f"update has tensor {name!r} that the model does not have")
            if tuple(target.shape) != tuple(tensor.shape):
                raise WeightsError(f"tensor {name!r}: update shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
            digest = received.update(name, tensor)
            cast = tensor.to(target.dtype)
            cast_digest = digest if cast.dtype == tensor.dtype else Checksum.of(name, cast)
            loaded.add(cast_digest)
            target.copy_(cast)
            if not _landed(name, target, cast, cast_digest):
                raise WeightsError(f"tensor {name!r} does not hold the received values after the copy")
            order.append(name)
            nbytes += tensor.numel() * tensor.element_size()
    missing = sorted(set(targets) - set(order))
    if require_all and missing:
        raise WeightsError(f"update misses {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")
    return {"received": received.hexdigest(), "loaded": loaded.hexdigest(), "num_bytes": nbytes,
            "num_tensors": len(order)}
