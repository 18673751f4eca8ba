"""Same-node weight transfer through shared memory (no Ray): the colocated path of a refresh.

The sender owns a few reusable shared-memory slots (``SharedSlots``). Each bucket of a refresh is
copied once into a slot (from host memory, or straight from the GPU), checked for non-finite values
and checksummed there while the bytes are still in cache, and announced as a ``SharedBucket``: the
slot's name and where each tensor lies. A replica on the same node maps the slot once
(``shared_tensors``) and copies the tensors into its transformer, verifying as it does for the
object store. Slots are reused from refresh to refresh, so their pages stay mapped on both sides:
a refresh costs the copies, not page faults. Replicas on other nodes take the object-store path.
A slot's name carries its sender's pid (and pid namespace): a sender killed with its whole process
group (as Ray kills workers) cannot unlink its slots, so the next sender on the node does
(:func:`sweep_orphaned_slots`) instead of leaving them in ``/dev/shm`` until the node reboots.
"""

from __future__ import annotations

import atexit
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory

import torch

from anisora_ray.errors import WeightsError
from anisora_ray.weights.state import (
    Bucket,
    Checksum,
    TensorEntry,
    dtype_name,
    nbytes_of,
    refuse_non_finite,
    refuse_non_finite_many,
    unpack_bucket,
)

ALIGN = 64  # tensor offsets in a slot: cache-line aligned
PREFIX = "anisora"
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").split("[")[-1].rstrip("]")
    except OSError:
        return "0"


def slot_name() -> str:
    """A new slot's name: ``anisora-<pid namespace>-<pid>-<random>``."""
    return f"{PREFIX}-{_pid_namespace()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def sweep_orphaned_slots(directory: str = SHM_DIR) -> list[str]:
    """Unlink the slots whose sender (a process of this pid namespace) is gone; returns their names.
    A replica that still maps one keeps its mapping: only the name goes."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    namespace, removed = _pid_namespace(), []
    for name in names:
        parts = name.split("-")
        if len(parts) != 4 or parts[0] != PREFIX or parts[1] != namespace or not parts[2].isdigit():
            continue
        if not _alive(int(parts[2])):
            try:
                os.unlink(os.path.join(directory, name))
                removed.append(name)
            except OSError:  # another sender swept it first
                pass
    return removed


@dataclass(frozen=True)
class SharedBucket:
    """A bucket staged in a shared-memory slot of the sender's node."""

    entries: tuple[TensorEntry, ...]
    segment: str  # the slot's shared-memory name
    offsets: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def _close(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.close()
    except BufferError:  # a view is still alive somewhere: the mapping goes when it does
        pass


def _as_bytes(segment: shared_memory.SharedMemory) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(segment.buf, dtype=torch.uint8)


class Slots:
    """A sender's reusable staging buffers, one per bucket in flight; subclasses say where a buffer lives
    (:meth:`buffer`) and what a replica is told about a staged bucket (:meth:`announce`)."""

    def __init__(self, count: int):
        self.count = count

    def buffer(self, index: int, nbytes: int) -> torch.Tensor:
        """Slot ``index`` as at least ``nbytes`` of ``uint8`` (grown when a bucket does not fit)."""
        raise NotImplementedError

    def announce(self, index: int, entries: tuple[TensorEntry, ...], offsets: tuple[int, ...]):
        raise NotImplementedError

    def stage(self, index: int, chunk: list[tuple[str, torch.Tensor]], checksum: Checksum | None,
              where: str) -> tuple[object, list[tuple[str, torch.Tensor]]]:
        """Copy ``chunk`` into slot ``index % count``; unless ``checksum`` is None (another route checked the
        bucket), refuse non-finite values and add each staged tensor to it. Returns the announcement and the
        staged tensors (views of the slot, valid until the slot is staged again)."""
        offsets, total = [], 0
        for _, tensor in chunk:
            offsets.append(total)
            total += -(-nbytes_of(tensor) // ALIGN) * ALIGN
        slot = index % self.count
        memory = self.buffer(slot, total)
        entries, views = [], []
        per_tensor = checksum is not None and checksum.scheme == "xxh3"
        for (name, tensor), offset in zip(chunk, offsets, strict=True):
            nbytes = tensor.numel() * tensor.element_size()
            staged = memory[offset: offset + nbytes].view(tensor.dtype).view(tensor.shape)
            staged.copy_(tensor.detach())  # the one copy (from the GPU to the host: the device-to-host copy itself)
            if per_tensor:  # checked and hashed while the bytes are still in cache
                refuse_non_finite(name, staged, where)
                checksum.update(name, staged)
            entries.append(TensorEntry(name, dtype_name(tensor.dtype), tuple(tensor.shape), nbytes))
            views.append((name, staged))
        if checksum is not None and not per_tensor:  # on a device: one synchronisation for the bucket
            refuse_non_finite_many(views, where)
            checksum.update_many(views)
        return self.announce(slot, tuple(entries), tuple(offsets)), views


class SharedSlots(Slots):
    """Slots in host shared memory (stdlib ``SharedMemory``), unlinked at exit or :meth:`close`."""

    def __init__(self, count: int):
        super().__init__(count)
        self.segments: list[shared_memory.SharedMemory | None] = [None] * count
        atexit.register(self.close)
        sweep_orphaned_slots()

    def _slot(self, index: int, nbytes: int) -> shared_memory.SharedMemory:
        segment = self.segments[index]
        if segment is None or segment.size < nbytes:
            if segment is not None:
                _close(segment)
                segment.unlink()
            segment = shared_memory.SharedMemory(name=slot_name(), create=True, size=max(nbytes, 1))
            self.segments[index] = segment
        return segment

    def buffer(self, index: int, nbytes: int) -> torch.Tensor:
        return _as_bytes(self._slot(index, nbytes))

    def announce(self, index: int, entries: tuple[TensorEntry, ...], offsets: tuple[int, ...]) -> SharedBucket:
        return SharedBucket(entries, self.segments[index].name, offsets)

    def close(self) -> None:
        for i, segment in enumerate(self.segments):
            if segment is not None:
                _close(segment)
                try:
                    segment.unlink()
                except FileNotFoundError:
                    pass
                self.segments[i] = None


_SENDER: dict[int, SharedSlots] = {}


def sender_slots(count: int) -> SharedSlots:
    """This process's slots (kept for its next refresh, so their pages stay mapped)."""
    slots = _SENDER.get(count)
    if slots is None:
        slots = _SENDER[count] = SharedSlots(count)
    return slots


_ATTACHED: dict[str, shared_memory.SharedMemory] = {}
_USED: set[str] = set()  # slots read since the last release


def _attach(name: str) -> shared_memory.SharedMemory:
    segment = _ATTACHED.get(name)
    if segment is None:
        try:
            segment = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise WeightsError(f"shared-memory slot {name} is gone (the sender exited or is on another node)") from None
        try:  # the sender owns the slot: this process must not unlink it when it exits (Python < 3.13)
            resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001
        except Exception:  # noqa: BLE001 - not registered on Python versions that do not track attachments
            pass
        _ATTACHED[name] = segment
    return segment


def shared_tensors(bucket: SharedBucket) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a staged bucket, as views of the sender's slot (mapped once per slot and process)."""
    memory = _as_bytes(_attach(bucket.segment))
    _USED.add(bucket.segment)
    for e, offset in zip(bucket.entries, bucket.offsets, strict=True):
        yield e.name, memory[offset: offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)


def bucket_items(bucket: SharedBucket | Bucket) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a bucket from either transport."""
    return shared_tensors(bucket) if isinstance(bucket, SharedBucket) else unpack_bucket(bucket)


def release_unused() -> None:
    """After an update: unmap the slots it did not read (an earlier sender's, which has moved on or exited)."""
    for name in [n for n in _ATTACHED if n not in _USED]:
        _close(_ATTACHED.pop(name))
    _USED.clear()
