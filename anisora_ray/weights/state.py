"""Named tensors on the wire: checksums, buckets and safetensors folders (no Ray here).

A bucket is a manifest of tensors plus their bytes as ``uint8`` numpy views of the tensors
themselves: no packing copy. ``ray.put`` writes each view straight into the object store (pickle
protocol 5 out-of-band buffers), which is the one host copy a refresh makes, and a replica reads
them back as zero-copy views. The checksum covers names, dtypes, shapes and bytes, in the order
the tensors are sent.
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
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    entries: tuple[TensorEntry, ...]
    arrays: tuple[np.ndarray, ...]  # uint8, 1-D: one per entry, views of the tensors until put

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a uint8 numpy view (a CPU copy first when it lives elsewhere)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


ROW_WORDS = 1024
_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
SCHEMES = ("xxh3", "fp")
FP_ACCUMULATE = torch.int64  # row and column sums; any integer type gives an exact, order-free (wrapping) sum


def fingerprint_vector(tensor: torch.Tensor) -> torch.Tensor:
    """An exact integer fingerprint of a tensor's bytes, computed where it lives (int64, same values on any device).

    The bytes, read as the widest integer words that tile them (8 bytes where they can: a reduction's
    cost is per word), are laid out in rows of 1024: the fingerprint is every row's sum, every column's
    sum and the words left over, summed in int64 (wrap-around is exact and order-free). Any changed word
    changes its row's sum; two words swapped change a row's or a column's sum unless they are equal. Two
    reductions over the tensor: GPU transports verify at memory speed without copying the bytes to the
    host (scheme ``fp``)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    size = next(size for size in (8, 4, 2, 1) if flat.numel() % size == 0)
    words = flat.view(_WORDS[size])
    full = words.numel() - words.numel() % ROW_WORDS
    parts = []
    if full:
        rows = words[:full].view(-1, ROW_WORDS)
        parts += [rows.sum(1, dtype=FP_ACCUMULATE).long(), rows.sum(0, dtype=FP_ACCUMULATE).long()]
    parts.append(words[full:].to(torch.int64))
    return torch.cat(parts)


def _header(name: str, tensor: torch.Tensor) -> bytes:
    return f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode()


def digests(named: list[tuple[str, torch.Tensor]], scheme: str) -> list[bytes]:
    """Per-tensor digests of (name, dtype, shape, bytes): ``xxh3`` hashes the bytes on the host (~30 GB/s a
    core); ``fp`` hashes each tensor's :func:`fingerprint_vector`, computed on its device, with one copy to
    the host for all of ``named``."""
    if scheme == "xxh3":
        return [Checksum.of(name, tensor) for name, tensor in named]
    if scheme != "fp":
        raise ValueError(f"checksum scheme {scheme!r}: expected one of {SCHEMES}")
    vectors = [fingerprint_vector(t) for _, t in named]
    if not vectors:
        return []
    devices = {v.device for v in vectors}
    flat = (torch.cat(vectors) if len(devices) == 1 else torch.cat([v.cpu() for v in vectors])).cpu().numpy()
    out, start = [], 0
    for (name, tensor), vector in zip(named, vectors, strict=True):
        h = xxhash.xxh3_128(b"fp|" + _header(name, tensor))
        h.update(memoryview(flat[start: start + vector.numel()]))
        out.append(h.digest())
        start += vector.numel()
    return out


class Checksum:
    """sha256 over per-tensor digests of (name, dtype, shape, bytes), in the order given.

    Scheme ``xxh3`` (host transports): XXH3-128 of the bytes. Scheme ``fp`` (GPU transports): XXH3-128 of an
    exact integer fingerprint computed on the device (:func:`fingerprint_vector`); its checksums carry an
    ``fp:`` prefix. Both detect corrupted, truncated, mixed-up or stale transfers; neither is a defence
    against an adversary who can write to the object store (nothing here is).
    """

    def __init__(self, scheme: str = "xxh3") -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"checksum scheme {scheme!r}: expected one of {SCHEMES}")
        self.scheme = scheme
        self._h = hashlib.sha256()

    @staticmethod
    def of(name: str, tensor: torch.Tensor) -> bytes:
        h = xxhash.xxh3_128(_header(name, tensor))
        h.update(memoryview(raw_bytes(tensor)))
        return h.digest()

    def add(self, digest: bytes) -> None:
        self._h.update(digest)

    def update(self, name: str, tensor: torch.Tensor) -> bytes:
        digest = digests([(name, tensor)], self.scheme)[0]
        self.add(digest)
        return digest

    def update_many(self, named: list[tuple[str, torch.Tensor]]) -> list[bytes]:
        out = digests(named, self.scheme)
        for digest in out:
            self.add(digest)
        return out

    def hexdigest(self) -> str:
        return ("fp:" if self.scheme == "fp" else "") + self._h.hexdigest()


def scheme_of(checksum: str) -> str:
    """The scheme a checksum string was made with."""
    return "fp" if checksum.startswith("fp:") else "xxh3"


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
    """Raise :class:`WeightsError` for a floating tensor holding NaN or inf.

    A float32 sum (one vectorized pass, ~35 GB/s a core) is finite for any finite tensor short of
    sums beyond 3e38; only when it is not are the values checked one by one, so the verdict is exact."""
    if not tensor.is_floating_point():
        return
    fast = torch.sum(tensor, dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    if not bool(fast.isfinite()) and not bool(torch.isfinite(tensor).all()):
        raise WeightsError(f"{where}: tensor {name!r} has non-finite values; refusing to publish diverged weights")


def refuse_non_finite_many(named: list[tuple[str, torch.Tensor]], where: str) -> None:
    """:func:`refuse_non_finite` for a bucket, with one synchronisation for all its tensors (GPU transports)."""
    floats = [(name, t) for name, t in named if t.is_floating_point()]
    if not floats:
        return
    sums = torch.stack([torch.sum(t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).double()
                        for _, t in floats])
    if not bool(sums.isfinite().all()):
        for name, tensor in floats:
            refuse_non_finite(name, tensor, where)


def pack_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Tensors, in order, in buckets of about ``bucket_bytes`` (a larger tensor gets its own); a bucket holds
    views of contiguous host tensors (nothing is copied here), so put it before the tensors change."""
    for group in group_by_size(tensors, bucket_bytes):
        entries, arrays = [], []
        for name, tensor in group:
            raw = raw_bytes(tensor)
            entries.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), int(raw.nbytes)))
            arrays.append(raw)
        yield Bucket(tuple(entries), tuple(arrays))


def unpack_bucket(bucket: Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a bucket, as views of its buffers (read-only when they live in the object store)."""
    for e, array in zip(bucket.entries, bucket.arrays, strict=True):
        with warnings.catch_warnings():  # object-store buffers are read-only; we only read them
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(array)
        yield e.name, raw.view(getattr(torch, e.dtype)).reshape(e.shape)


def bucket_tensors(buckets: Iterable[Bucket]) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in buckets:
        yield from unpack_bucket(bucket)


def _equal_on_device(target: torch.Tensor, cast: torch.Tensor) -> bool:
    """Whether ``target`` holds ``cast`` bit for bit, compared on the target's device in its widest word."""
    nbytes = target.numel() * target.element_size()
    word = next(dt for dt, size in ((torch.int64, 8), (torch.int32, 4), (torch.uint8, 1)) if nbytes % size == 0)
    flat = target.contiguous().reshape(-1).view(torch.uint8).view(word)
    return torch.equal(flat, cast.to(target.device).contiguous().reshape(-1).view(torch.uint8).view(word))


class TensorCopier:
    """Copies named tensors into ``targets`` (views of a module's state), part by part, and verifies what landed.

    ``received`` is the checksum of what arrived, ``loaded`` of what the targets now hold (the
    received tensors in the targets' dtypes, checked bit for bit after each copy). When no cast is
    needed, one digest of the target after the copy serves as both: it equals the sender's digest
    only if the bytes arrived intact *and* landed, so a tensor is read twice (copy, digest) instead
    of three times. Scheme ``xxh3`` digests on the host, tensor by tensor; ``fp`` on the targets'
    device, one synchronisation per part. Unknown names or shapes and copies that did not land raise
    :class:`WeightsError`; :meth:`report` (``require_all``) also names targets left without a tensor.
    """

    def __init__(self, targets: Mapping[str, torch.Tensor], scheme: str = "xxh3"):
        self.targets, self.scheme = targets, scheme
        self.received, self.loaded, self.order, self.nbytes = Checksum(scheme), Checksum(scheme), [], 0

    def add(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            if self.scheme == "fp":
                self._add_on_device(tensors)
                return
            for name, tensor in tensors:
                self._copy(name, tensor)

    def _target(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        target = self.targets.get(name)
        if target is None:
            raise WeightsError(f"update has tensor {name!r} that the model does not have")
        if tuple(target.shape) != tuple(tensor.shape):
            raise WeightsError(f"tensor {name!r}: update shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
        return target

    def _add_on_device(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        landed, cast_from = [], {}
        for name, tensor in tensors:
            target = self._target(name, tensor)
            source = tensor
            if target.dtype != tensor.dtype:
                source = tensor.to(target.dtype)
                cast_from[len(landed)] = (name, tensor, source)
            target.copy_(source, non_blocking=True)
            landed.append((name, target))
            self.order.append(name)
            self.nbytes += tensor.numel() * tensor.element_size()
        held = digests(landed, "fp")  # one synchronisation: every copy of the part has finished
        extra = [(n, t) for n, t, _ in cast_from.values()] + [(n, c) for n, _, c in cast_from.values()]
        extra_digests = digests(extra, "fp")
        received = dict(zip(cast_from, extra_digests[:len(cast_from)], strict=True))
        cast = dict(zip(cast_from, extra_digests[len(cast_from):], strict=True))
        for i, digest in enumerate(held):
            if i in cast and cast[i] != digest:
                raise WeightsError(f"tensor {landed[i][0]!r} does not hold the received values after the copy")
            self.received.add(received.get(i, digest))
            self.loaded.add(digest)

    def _copy(self, name: str, tensor: torch.Tensor) -> None:
        target = self._target(name, tensor)
        if target.device.type == "cpu" and target.dtype == tensor.dtype:
            target.copy_(tensor)
            digest = Checksum.of(name, target)  # intact and landed, in one read
            self.received.add(digest)
            self.loaded.add(digest)
        else:
            digest = self.received.update(name, tensor)
            cast = tensor.to(target.dtype)
            cast_digest = digest if cast.dtype == tensor.dtype else Checksum.of(name, cast)
            self.loaded.add(cast_digest)
            target.copy_(cast)
            landed = (Checksum.of(name, target) == cast_digest if target.device.type == "cpu"
                      else _equal_on_device(target, cast))
            if not landed:
                raise WeightsError(f"tensor {name!r} does not hold the received values after the copy")
        self.order.append(name)
        self.nbytes += tensor.numel() * tensor.element_size()

    def report(self, require_all: bool) -> dict:
        missing = sorted(set(self.targets) - set(self.order))
        if require_all and missing:
            raise WeightsError(f"update misses {len(missing)} tensor(s) of the model, e.g. {missing[:3]}")
        return {"received": self.received.hexdigest(), "loaded": self.loaded.hexdigest(), "num_bytes": self.nbytes,
                "num_tensors": len(self.order)}


def copy_into(targets: Mapping[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]], *,
              require_all: bool) -> dict:
    """Copy named tensors into ``targets`` and verify what landed (see :class:`TensorCopier`); returns its report."""
    copier = TensorCopier(targets)
    copier.add(tensors)
    return copier.report(require_all)
