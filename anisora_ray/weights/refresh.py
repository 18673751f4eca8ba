"""Weight refresh: get trained weights to every replica and verify that each one loaded them.

Two transports, one check. ``stream_update`` sends a trainer's live tensors, bucket by bucket,
through the object store: each bucket is written there once (the only host copy) and every
replica copies it in while the next bucket is being put, with at most ``window`` buckets in
flight; the replicas commit once the sender's checksum is known. ``refresh_from_storage`` sends
only the metadata of a trained folder and each replica streams the folder from storage itself.
Either way the process that calls it never holds more than a bucket, and every replica must
report the new version and the same checksum of what it loaded: any replica that fails, lags or
disagrees makes the refresh raise :class:`WeightsError`. (``publish_tensors`` + ``refresh_actors``
put a whole update first and load it after: small models and tests.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights.shared import sender_slots
from anisora_ray.weights.state import Checksum, pack_buckets, refuse_non_finite
from anisora_ray.weights.update import UpdateMeta, folder_update, read_folder


@dataclass
class WeightsUpdate:
    meta: UpdateMeta
    buckets: list[Any] = field(default_factory=list)  # ray.ObjectRef of weights.state.Bucket

    @property
    def version(self) -> int:
        return self.meta.version.version


def publish_tensors(tensors: Iterable[tuple[str, torch.Tensor]], version: int, kind: str, *, uri: str = "",
                    lora: dict | None = None, bucket_mb: float = 256.0) -> WeightsUpdate:
    """Put named tensors (streamed: at most one bucket is packed at a time) into the object store."""
    checksum, count, refs, nbytes = Checksum(), 0, [], 0

    def counted():
        nonlocal count
        for name, tensor in tensors:
            refuse_non_finite(name, tensor, uri or "update")
            checksum.update(name, tensor)
            count += 1
            yield name, tensor

    for bucket in pack_buckets(counted(), int(bucket_mb * 2**20)):
        refs.append(ray.put(bucket))
        nbytes += bucket.nbytes
    record = WeightsVersion(version=version, kind=kind, uri=uri, checksum=checksum.hexdigest(),
                            num_bytes=nbytes, num_tensors=count)
    return WeightsUpdate(UpdateMeta(record, lora), refs)


def publish(uri: str, version: int, bucket_mb: float = 256.0) -> WeightsUpdate:
    """Put the weights of folder ``uri`` into the object store from this process (small models, tests);
    replicas load large folders from storage themselves (:func:`refresh_from_storage`)."""
    kind, lora_config, tensors = read_folder(uri)
    return publish_tensors(tensors, version, kind, uri=uri, lora=lora_config.model_dump() if lora_config else None,
                           bucket_mb=bucket_mb)


def _failure(index: int, exc: Exception) -> str:
    return f"replica {index}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"


def _collect(actors: list, version: int, call: Callable[[Any], Any], timeout_s: float,
             failures: dict[int, str] | None = None) -> list[dict]:
    """Call every actor not in ``failures`` (index -> what went wrong earlier) and check the reports agree."""
    failures = dict(failures or {})
    calls = {i: call(actor) for i, actor in enumerate(actors) if i not in failures}
    reports = []
    for index, pending in calls.items():
        try:
            reports.append(ray.get(pending, timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - every replica is checked before raising
            failures[index] = _failure(index, exc)
    if failures:
        failures = [failures[i] for i in sorted(failures)]
        raise WeightsError(f"weights refresh to version {version} failed on {len(failures)} of "
                           f"{len(actors)} replica(s): " + "; ".join(failures))
    versions = {r["version"] for r in reports}
    loaded = {r["loaded"] for r in reports}
    if versions != {version} or len(loaded) != 1:
        raise WeightsError(f"replicas disagree after the refresh to version {version}: versions {versions}, "
                           f"{len(loaded)} distinct checksums")
    return reports


def stream_update(actors: list, chunks: Iterable[list[tuple[str, torch.Tensor]]], version: int, kind: str, *,
                  uri: str = "", lora: dict | None = None, nodes: list[str] | None = None, window: int = 2,
                  timeout_s: float = 1800.0) -> tuple[UpdateMeta, list[dict]]:
    """Send named tensors (``chunks``: one bucket each, e.g. a trainer's gathered buckets) to every actor as
    weights ``version`` and verify; returns the update's metadata and the replicas' load reports.

    Replicas whose node id (``nodes``) is this process's node read each bucket from a shared-memory slot
    (:mod:`.shared`); the others from the object store (one ``ray.put`` per bucket, whatever their number).
    Every bucket is checked for non-finite values and checksummed once; the replicas copy it in
    (``load_part``) while the sender works on the next, and the sender waits while ``window`` buckets are
    still being loaded. A chunk's tensors may change once the next chunk is requested.
    If a bucket is refused (non-finite values) after replicas loaded earlier ones, those replicas hold a
    partial update and refuse to generate until a whole update is loaded."""
    here = ray.get_runtime_context().get_node_id()
    local = {i for i, node in enumerate(nodes or []) if node == here}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the copies and checks are memory-bound: spare cores go to the replicas' copies
    try:
        return _stream(actors, chunks, version, kind, uri, lora, local, window, timeout_s)
    finally:
        torch.set_num_threads(threads)


def _stream(actors, chunks, version, kind, uri, lora, local, window, timeout_s) -> tuple[UpdateMeta, list[dict]]:
    failures: dict[int, str] = {}
    where = uri or f"weights version {version}"

    def settle(refs: dict[int, Any]) -> None:
        for index, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - this replica gets no more parts; the others go on
                failures.setdefault(index, _failure(index, exc))

    settle({i: a.begin_update.remote(version, kind, lora) for i, a in enumerate(actors)})
    slots = sender_slots(window + 1) if local else None
    checksum, count, nbytes, in_flight = Checksum(), 0, 0, deque()
    for index, chunk in enumerate(chunks):
        while len(in_flight) > window:  # the slot about to be staged again has been read by everyone
            settle(in_flight.popleft())
        active = [i for i in range(len(actors)) if i not in failures]
        calls: dict[int, Any] = {}
        if slots is not None:
            shared, chunk = slots.stage(index, chunk, checksum, where)
            calls.update({i: actors[i].load_part.remote(version, shared) for i in active if i in local})
        else:
            chunk = [(name, tensor.detach().cpu()) for name, tensor in chunk]  # one host copy from a device
            for name, tensor in chunk:
                refuse_non_finite(name, tensor, where)
                checksum.update(name, tensor)
        if any(i not in local for i in active):
            ref = ray.put(next(pack_buckets(chunk, 2**62)))
            calls.update({i: actors[i].load_part.remote(version, ref) for i in active if i not in local})
            del ref  # the calls hold it until every replica has copied it
        count += len(chunk)
        nbytes += sum(t.numel() * t.element_size() for _, t in chunk)
        in_flight.append(calls)
    while in_flight:
        settle(in_flight.popleft())
    record = WeightsVersion(version=version, kind=kind, uri=uri, checksum=checksum.hexdigest(), num_bytes=nbytes,
                            num_tensors=count)
    return UpdateMeta(record, lora), _collect(actors, version, lambda a: a.commit_update.remote(record), timeout_s, failures)


def refresh_actors(actors: list, update: WeightsUpdate, timeout_s: float = 1800.0) -> list[dict]:
    """Load an object-store ``update`` on every actor (in parallel) and verify versions and checksums agree."""
    return _collect(actors, update.version, lambda a: a.load_weights.remote(update.meta, update.buckets), timeout_s)


def refresh_from_storage(actors: list, uri: str, version: int, timeout_s: float = 1800.0) -> tuple[UpdateMeta, list[dict]]:
    """Every actor streams the trained folder ``uri`` from storage as ``version``; this process reads
    only the folder's manifest. Without a manifest the replicas' agreement is the only check.
    Returns the update's metadata (with the checksum the replicas measured when the folder had none)."""
    meta = folder_update(uri, version)
    reports = _collect(actors, version, lambda a: a.load_weights_from.remote(meta), timeout_s)
    record = meta.version
    if not record.checksum:  # a folder written by another tool: take what the replicas measured
        first = reports[0]
        record = WeightsVersion(version=version, kind=record.kind, uri=uri, checksum=first["received"],
                                num_bytes=first["num_bytes"], num_tensors=first["num_tensors"])
    return UpdateMeta(record, meta.lora), reports
