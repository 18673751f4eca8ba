"""Colocated GPU transfer through CUDA IPC (no Ray): the refresh path when a replica sees the trainer's GPU.

The sender owns a few reusable slots in GPU memory (``DeviceSlots``). Each bucket is copied once
into a slot (device to device), checked for non-finite values and fingerprinted there (checksum
scheme ``fp``, one synchronisation per bucket), and announced as a ``DeviceBucket``: the slot's
CUDA IPC handle (``torch.multiprocessing.reductions.reduce_tensor``, made once per slot) and where
each tensor lies. A replica opens a slot once, finds the GPU by its UUID (processes number their
visible GPUs differently), and copies the tensors into its transformer on the device; the sender
reuses a slot only after every replica has returned from that bucket. Nothing crosses the host
but the announcement.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from anisora_ray.errors import WeightsError
from anisora_ray.weights.shared import Slots
from anisora_ray.weights.state import TensorEntry

_DEVICE_ARG = 6  # rebuild_cuda_tensor's storage_device argument


def gpu_uuid(device: torch.device | int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def visible_gpu_uuids() -> list[str]:
    """UUIDs of the GPUs this process sees (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [gpu_uuid(i) for i in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class DeviceBucket:
    """A bucket staged in a GPU slot of the sender."""

    entries: tuple[TensorEntry, ...]
    slot: str  # the slot's identity, "<slot set>:<slot>:<generation>": what a replica keys its opened slots by
    gpu: str  # UUID of the GPU that holds it
    handle: tuple  # reduce_tensor's (rebuild function, arguments), made once per slot
    offsets: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


class DeviceSlots(Slots):
    """The sender's reusable GPU slots on ``device``; a slot grows (and gets a new handle) when a bucket does not fit."""

    def __init__(self, count: int, device: torch.device):
        from torch.multiprocessing.reductions import reduce_tensor

        super().__init__(count)
        self.device, self.gpu = device, gpu_uuid(device)
        self._reduce = reduce_tensor
        self.tensors: list[torch.Tensor | None] = [None] * count
        self.handles: list[tuple | None] = [None] * count
        self.token = uuid.uuid4().hex  # unique to this set of slots: another set (or sender) never collides
        self.generation = 0
        self.generations = [0] * count

    def buffer(self, index: int, nbytes: int) -> torch.Tensor:
        tensor = self.tensors[index]
        if tensor is None or tensor.numel() < nbytes:
            self.tensors[index] = tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            self.handles[index] = self._reduce(tensor)
            self.generation += 1
            self.generations[index] = self.generation
        return tensor

    def announce(self, index: int, entries: tuple[TensorEntry, ...], offsets: tuple[int, ...]) -> DeviceBucket:
        torch.cuda.synchronize(self.device)  # the staged bytes are in the slot before any replica reads them
        return DeviceBucket(entries, f"{self.token}:{index}:{self.generations[index]}", self.gpu,
                            self.handles[index], offsets)


_SENDER: dict[tuple[int, str], DeviceSlots] = {}


def device_slots(count: int, device: torch.device) -> DeviceSlots:
    """This process's GPU slots on ``device`` (kept for its next refresh: replicas keep them open)."""
    key = (count, str(device))
    slots = _SENDER.get(key)
    if slots is None:
        slots = _SENDER[key] = DeviceSlots(count, device)
    return slots


_OPENED: dict[str, torch.Tensor] = {}
_USED: set[str] = set()


def _open(bucket: DeviceBucket) -> torch.Tensor:
    tensor = _OPENED.get(bucket.slot)
    if tensor is None:
        uuids = visible_gpu_uuids()
        if bucket.gpu not in uuids:
            raise WeightsError(f"CUDA IPC: the trainer's GPU {bucket.gpu} is not visible to this replica "
                               f"(it sees {uuids or 'no GPU'}); use loop.refresh_transport: collective")
        rebuild, args = bucket.handle
        args = list(args)
        args[_DEVICE_ARG] = uuids.index(bucket.gpu)
        tensor = _OPENED[bucket.slot] = rebuild(*args)
    _USED.add(bucket.slot)
    return tensor


def device_tensors(bucket: DeviceBucket) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a staged bucket, as views of the sender's GPU slot (opened once per slot and process)."""
    memory = _open(bucket)
    for e, offset in zip(bucket.entries, bucket.offsets, strict=True):
        yield e.name, memory[offset: offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)


def release_unused() -> None:
    """After an update: close the slots it did not read (an earlier sender's)."""
    for name in [n for n in _OPENED if n not in _USED]:
        del _OPENED[name]
    _USED.clear()
