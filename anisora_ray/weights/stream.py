"""Streaming an update to replicas bucket by bucket over one or more routes, and checking that they agree
(no Ray: the caller supplies how to call a replica, :class:`Replicas`).

A route is one way to a set of replicas: shared-memory slots (same node), GPU slots opened through
CUDA IPC (a replica that sees the trainer's GPU), a broadcast group (NCCL or gloo), or a packer that
puts each bucket somewhere the replicas read it (the object store). The first route stages each
bucket from the trainer's tensors and checks it (non-finite values, checksum) once; the next routes
take its staged copy. Every replica loads bucket i while bucket i+1 is staged; at most ``window``
buckets are being loaded at once, so a slot is staged again only after every replica has read it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights.shared import Slots
from anisora_ray.weights.state import Checksum, pack_buckets, refuse_non_finite
from anisora_ray.weights.update import UpdateMeta

Chunk = list[tuple[str, torch.Tensor]]


class Replicas(Protocol):
    """How a sender calls replica ``index``'s methods (asynchronously) and waits for a call's result."""

    def call(self, index: int, method: str, *args) -> Any: ...

    def wait(self, handle: Any, timeout_s: float) -> Any: ...


@dataclass
class Route:
    """Replicas ``indices`` reached through ``slots`` (staged copies), or through ``put`` (a packed bucket
    handed to a store; with no slots the route stages on the host itself). A route whose slots ``send``
    (a broadcast group) fails as a whole when one of its replicas does."""

    name: str
    indices: list[int]
    slots: Slots | None = None
    put: Callable[[Any], Any] | None = None
    close: Callable[[], None] | None = None
    broken: str = field(default="", init=False)

    @property
    def grouped(self) -> bool:
        return hasattr(self.slots, "send")

    def stage(self, index: int, chunk: Chunk, checksum: Checksum | None, where: str) -> tuple[Any, Chunk]:
        if self.slots is not None:
            return self.slots.stage(index, chunk, checksum, where)
        chunk = [(name, tensor.detach().cpu()) for name, tensor in chunk]  # one host copy from a device
        if checksum is not None:
            for name, tensor in chunk:
                refuse_non_finite(name, tensor, where)
                checksum.update(name, tensor)
        return self.put(next(pack_buckets(chunk, 2**62))), chunk


def failure_text(index: int, exc: Exception) -> str:
    return f"replica {index}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"


def collect(replicas: Replicas, count: int, version: int, method: str, args: tuple, timeout_s: float,
            failures: dict[int, str] | None = None) -> list[dict]:
    """Call ``method(*args)`` on every replica not in ``failures`` (index -> what went wrong earlier) and check
    that every one reports ``version`` and the same checksum of what it holds."""
    failures = dict(failures or {})
    calls = {i: replicas.call(i, method, *args) for i in range(count) if i not in failures}
    reports = []
    for index, pending in calls.items():
        try:
            reports.append(replicas.wait(pending, timeout_s))
        except Exception as exc:  # noqa: BLE001 - every replica is checked before raising
            failures[index] = failure_text(index, exc)
    if failures:
        failed = [failures[i] for i in sorted(failures)]
        raise WeightsError(f"weights refresh to version {version} failed on {len(failed)} of "
                           f"{count} replica(s): " + "; ".join(failed))
    versions = {r["version"] for r in reports}
    loaded = {r["loaded"] for r in reports}
    if versions != {version} or len(loaded) != 1:
        raise WeightsError(f"replicas disagree after the refresh to version {version}: versions {versions}, "
                           f"{len(loaded)} distinct checksums")
    return reports


def stream_parts(replicas: Replicas, count: int, routes: list[Route], chunks: Iterable[Chunk], version: int,
                 kind: str, *, scheme: str = "xxh3", uri: str = "", lora: dict | None = None, window: int = 2,
                 timeout_s: float = 1800.0) -> tuple[UpdateMeta, list[dict]]:
    """Send ``chunks`` (one bucket each; a chunk's tensors may change once the next is requested) to the
    ``count`` replicas over ``routes`` as weights ``version`` and verify; returns the update's metadata
    and the replicas' load reports. Checksum ``scheme`` ``fp`` when the first route stages on a GPU.
    A replica that failed gets no more parts; if a bucket is refused (non-finite values) after replicas
    loaded earlier ones, those hold a partial update and refuse to generate until a whole one is loaded."""
    failures: dict[int, str] = {}
    where = uri or f"weights version {version}"

    def settle(pending: tuple[dict[int, Any], list[tuple[Route, Any]]]) -> None:
        calls, sends = pending
        for route, work in sends:
            try:
                work.wait()
            except Exception as exc:  # noqa: BLE001 - the group is broken: its replicas fail below or here
                route.broken = route.broken or f"{route.name} broadcast failed: {str(exc).splitlines()[0][:200]}"
        for index, handle in calls.items():
            try:
                replicas.wait(handle, timeout_s)
            except Exception as exc:  # noqa: BLE001 - this replica gets no more parts; the others go on
                failures.setdefault(index, failure_text(index, exc))
        for route in routes:
            if route.grouped and (route.broken or any(i in failures for i in route.indices)):
                route.broken = route.broken or f"{route.name} broken by a failed replica"
                for i in route.indices:
                    failures.setdefault(i, f"replica {i}: {route.broken}")

    try:
        settle(({i: replicas.call(i, "begin_update", version, kind, lora, scheme) for i in range(count)}, []))
        checksum, tensors, nbytes, in_flight = Checksum(scheme), 0, 0, deque()
        for index, chunk in enumerate(chunks):
            while len(in_flight) > window:  # the slots about to be staged again have been read by everyone
                settle(in_flight.popleft())
            if len(failures) == count:
                break
            calls: dict[int, Any] = {}
            sends: list[tuple[Route, Any]] = []
            staged = chunk
            for k, route in enumerate(routes):
                active = [i for i in route.indices if i not in failures]
                if k and not active:
                    continue
                message, staged = route.stage(index, staged, checksum if k == 0 else None, where)
                calls.update({i: replicas.call(i, "load_part", version, message) for i in active})
                if route.grouped and active:
                    sends.append((route, route.slots.send(index % route.slots.count)))
                del message  # the calls hold it until every replica has read it
            tensors += len(chunk)
            nbytes += sum(t.numel() * t.element_size() for _, t in chunk)
            in_flight.append((calls, sends))
        while in_flight:
            settle(in_flight.popleft())
    finally:
        for route in routes:
            if route.close is not None:
                route.close()
    record = WeightsVersion(version=version, kind=kind, uri=uri, checksum=checksum.hexdigest(), num_bytes=nbytes,
                            num_tensors=tensors)
    return UpdateMeta(record, lora), collect(replicas, count, version, "commit_update", (record,), timeout_s, failures)
