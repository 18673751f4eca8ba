"""Weight transfer by broadcast in a process group of the sender and the replicas (no Ray): the refresh path
between GPUs that do not share a process or a GPU (NCCL), or hosts (gloo).

The group is its own ``torch.distributed`` process group, made from a ``TCPStore`` that the sender
hosts: it lives beside a trainer's training group and never joins it. The sender (rank 0) stages
each bucket in a reusable buffer on its device (``GroupSlots``; one copy, checked and checksummed
there), the replicas are told the bucket's layout (``CollectiveBucket``) and each receives it with a
broadcast into a buffer of its own on its device, then copies the tensors into its transformer.
Every replica takes part in every broadcast, in order: one that fails breaks the group for this
update, which then fails as a whole after ``timeout_s`` (a retry or storage takes over).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from anisora_ray.errors import WeightsError
from anisora_ray.weights.shared import Slots
from anisora_ray.weights.state import TensorEntry


@dataclass(frozen=True)
class GroupSpec:
    """Where and how to join a weights group."""

    name: str
    address: str
    port: int
    world_size: int
    backend: str  # "nccl" (GPUs) or "gloo"
    timeout_s: float = 600.0


@dataclass(frozen=True)
class CollectiveBucket:
    """The layout of a bucket that the group's next broadcast carries."""

    entries: tuple[TensorEntry, ...]
    offsets: tuple[int, ...]
    total: int  # bytes broadcast (the tensors plus alignment)
    group: str

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class WeightsGroup:
    """One member of a weights group: rank 0 is the sender."""

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device, store=None):
        self.spec, self.rank, self.device = spec, rank, device
        timeout = timedelta(seconds=spec.timeout_s)
        self.store = store or dist.TCPStore(spec.address, spec.port, spec.world_size, False, timeout=timeout)
        if spec.backend == "nccl":
            torch.cuda.set_device(device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout  # noqa: SLF001 - the public constructor takes the timeout here
            self.group = dist.ProcessGroupNCCL(self.store, rank, spec.world_size, options)
        elif spec.backend == "gloo":
            self.group = dist.ProcessGroupGloo(self.store, rank, spec.world_size, timeout)
        else:
            raise WeightsError(f"weights group backend {spec.backend!r}: expected 'nccl' or 'gloo'")
        self._buffer: torch.Tensor | None = None

    @staticmethod
    def open_store(name: str, address: str, world_size: int, device: torch.device,
                   timeout_s: float) -> tuple[GroupSpec, dist.TCPStore]:
        """The sender's side, first: the group's store on a free port of ``address`` and the spec the others
        join with. Rank 0 then joins as ``WeightsGroup(spec, 0, device, store)``, which blocks until every
        member has joined, so the caller asks the replicas to join first."""
        store = dist.TCPStore(address, 0, world_size, True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return GroupSpec(name, address, store.port, world_size, backend_for(device), timeout_s), store

    def broadcast(self, tensor: torch.Tensor):
        """Broadcast ``tensor`` from rank 0 (in place on the others); returns the work to ``wait`` on."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self.group.broadcast([tensor], options)

    def receive(self, bucket: CollectiveBucket) -> Iterator[tuple[str, torch.Tensor]]:
        """Take part in the broadcast of ``bucket``; yields its tensors as views of this member's buffer
        (valid until the next bucket)."""
        if bucket.group != self.spec.name:
            raise WeightsError(f"a bucket of weights group {bucket.group} arrived; this replica is in {self.spec.name}")
        if self._buffer is None or self._buffer.numel() < bucket.total:
            self._buffer = torch.empty(max(bucket.total, 1), dtype=torch.uint8, device=self.device)
        memory = self._buffer[: bucket.total]
        try:
            self.broadcast(memory).wait()
        except Exception as exc:  # noqa: BLE001 - a peer failed or timed out: name the group
            raise WeightsError(f"weights group {self.spec.name}: broadcast failed ({str(exc).splitlines()[0][:200]})") from exc
        for e, offset in zip(bucket.entries, bucket.offsets, strict=True):
            yield e.name, memory[offset: offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)

    def close(self) -> None:
        self.group = None
        self.store = None
        self._buffer = None


class GroupSlots(Slots):
    """The sender's staging buffers for a group, on its device."""

    def __init__(self, count: int, device: torch.device, group: WeightsGroup):
        super().__init__(count)
        self.device, self.group = device, group
        self.tensors: list[torch.Tensor | None] = [None] * count
        self.totals = [0] * count

    def buffer(self, index: int, nbytes: int) -> torch.Tensor:
        tensor = self.tensors[index]
        if tensor is None or tensor.numel() < nbytes:
            self.tensors[index] = tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
        self.totals[index] = nbytes
        return tensor

    def announce(self, index: int, entries: tuple[TensorEntry, ...], offsets: tuple[int, ...]) -> CollectiveBucket:
        return CollectiveBucket(entries, offsets, self.totals[index], self.group.spec.name)

    def send(self, index: int):
        """Broadcast slot ``index`` (after the replicas were told its layout); returns the work."""
        return self.group.broadcast(self.tensors[index][: self.totals[index]])
