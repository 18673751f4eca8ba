"""Weight refresh: get trained weights to every replica and verify that each one loaded them.

Two ways, one check. ``stream_update`` sends a trainer's live tensors, bucket by bucket, over the
routes its transport picks (shared memory or the object store from the host; CUDA IPC or an NCCL
group from a GPU; :mod:`.stream` runs them): every replica copies bucket i in while bucket i+1 is
staged, and commits once the sender's checksum is known. ``refresh_from_storage`` sends
only the metadata of a trained folder and each replica streams the folder from storage itself.
Either way the process that calls it never holds more than a bucket, and every replica must
report the new version and the same checksum of what it loaded: any replica that fails, lags or
disagrees makes the refresh raise :class:`WeightsError`. (``publish_tensors`` + ``refresh_actors``
put a whole update first and load it after: small models and tests.)
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights.collective import GroupSlots, WeightsGroup
from anisora_ray.weights.cuda_ipc import device_slots, gpu_uuid
from anisora_ray.weights.shared import sender_slots
from anisora_ray.weights.state import Checksum, pack_buckets, refuse_non_finite
from anisora_ray.weights.stream import Chunk, Route, collect, stream_parts
from anisora_ray.weights.update import UpdateMeta, folder_update, read_folder

TRANSPORTS = ("auto", "host", "collective", "cuda_ipc")


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


class RayReplicas:
    """:class:`~anisora_ray.weights.stream.Replicas` for Ray actors."""

    def __init__(self, actors: list):
        self.actors = actors

    def call(self, index: int, method: str, *args):
        return getattr(self.actors[index], method).remote(*args)

    def wait(self, handle, timeout_s: float):
        return ray.get(handle, timeout=timeout_s)


def _first(chunks: Iterable[Chunk]) -> tuple[torch.device, Iterable[Chunk]]:
    """The device of the first chunk's tensors, and the chunks with that one put back in front."""
    chunks = iter(chunks)
    first = next(chunks, None)
    if first is None:
        return torch.device("cpu"), iter(())
    return (first[0][1].device if first else torch.device("cpu")), itertools.chain([first], chunks)


def _group_route(replicas: RayReplicas, indices: list[int], device: torch.device, window: int,
                 timeout_s: float) -> Route:
    """A broadcast group of this process (rank 0) and replicas ``indices``, joined before it returns."""
    spec, store = WeightsGroup.open_store(f"weights-{uuid.uuid4().hex[:8]}", ray.util.get_node_ip_address(),
                                          len(indices) + 1, device, timeout_s)
    joins = [replicas.call(i, "join_weights_group", spec, rank) for rank, i in enumerate(indices, start=1)]
    group = WeightsGroup(spec, 0, device, store)  # returns once every replica has joined
    ray.get(joins, timeout=timeout_s)
    return Route(f"{group.spec.backend} group", indices, GroupSlots(window + 1, device, group), close=group.close)


def plan_routes(replicas: RayReplicas, nodes: list[str] | None, device: torch.device, transport: str, window: int,
                timeout_s: float) -> tuple[list[Route], str]:
    """The routes of a refresh from tensors on ``device`` and its checksum scheme (see :func:`stream_update`)."""
    if transport not in TRANSPORTS:
        raise WeightsError(f"refresh transport {transport!r}: expected one of {TRANSPORTS}")
    count = len(replicas.actors)
    here = ray.get_runtime_context().get_node_id()
    local = [i for i, node in enumerate(nodes or []) if node == here]
    if transport == "collective":
        return [_group_route(replicas, list(range(count)), device, window, timeout_s)], "fp" if device.type == "cuda" else "xxh3"
    ipc, grouped, host = [], [], list(range(count))
    if device.type == "cuda" and transport in ("auto", "cuda_ipc"):
        sender = gpu_uuid(device)
        seen = ray.get([replicas.call(i, "weights_gpus") for i in range(count)], timeout=timeout_s)
        ipc = [i for i in range(count) if sender in seen[i]]
        grouped = [i for i in range(count) if seen[i] and i not in ipc]
        host = [i for i in range(count) if not seen[i]]
        if transport == "cuda_ipc" and len(ipc) < count:
            raise WeightsError(f"refresh transport cuda_ipc: replica(s) {sorted(set(range(count)) - set(ipc))} do not "
                               f"see the trainer's GPU {sender}; use auto or collective")
    elif transport == "cuda_ipc":
        raise WeightsError(f"refresh transport cuda_ipc needs the trainer's weights on a GPU (they are on {device})")
    routes = []
    if ipc:
        routes.append(Route("cuda ipc", ipc, device_slots(window + 1, device)))
    if grouped:
        routes.append(_group_route(replicas, grouped, device, window, timeout_s))
    scheme = "fp" if routes else "xxh3"
    if [i for i in host if i in local]:
        routes.append(Route("shared memory", [i for i in host if i in local], sender_slots(window + 1)))
    if [i for i in host if i not in local]:
        routes.append(Route("object store", [i for i in host if i not in local], put=ray.put))
    return routes, scheme


def stream_update(actors: list, chunks: Iterable[Chunk], version: int, kind: str, *, uri: str = "",
                  lora: dict | None = None, nodes: list[str] | None = None, window: int = 2,
                  transport: str = "auto", timeout_s: float = 1800.0) -> tuple[UpdateMeta, list[dict]]:
    """Send named tensors (``chunks``: one bucket each, e.g. a trainer's gathered buckets) to every actor as
    weights ``version`` and verify; returns the update's metadata and the replicas' load reports.

    ``transport``: ``host`` - replicas whose node id (``nodes``) is this process's node read each bucket from
    a shared-memory slot (:mod:`.shared`), the others from the object store (one ``ray.put`` per bucket,
    whatever their number); ``collective`` - one broadcast group of this process and every replica (NCCL
    when the weights are on a GPU, else gloo); ``cuda_ipc`` - every replica opens GPU slots of the trainer
    (:mod:`.cuda_ipc`; they must see its GPU); ``auto`` - weights on a GPU go through CUDA IPC to the
    replicas that see that GPU, an NCCL group to the other GPU replicas and the host routes to CPU
    replicas; weights on the host take the host routes. Every bucket is checked for non-finite values
    and checksummed once (on the GPU, scheme ``fp``, when a GPU route comes first); see
    :func:`.stream.stream_parts` for the pipelining and what a failure leaves behind."""
    device, chunks = _first(chunks)
    replicas = RayReplicas(actors)
    routes, scheme = plan_routes(replicas, nodes, device, transport, window, timeout_s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the copies and checks are memory-bound: spare cores go to the replicas' copies
    try:
        return stream_parts(replicas, len(actors), routes, chunks, version, kind, scheme=scheme, uri=uri, lora=lora,
                            window=window, timeout_s=timeout_s)
    finally:
        torch.set_num_threads(threads)


def refresh_actors(actors: list, update: WeightsUpdate, timeout_s: float = 1800.0) -> list[dict]:
    """Load an object-store ``update`` on every actor (in parallel) and verify versions and checksums agree."""
    return collect(RayReplicas(actors), len(actors), update.version, "load_weights", (update.meta, update.buckets),
                   timeout_s)


def refresh_from_storage(actors: list, uri: str, version: int, timeout_s: float = 1800.0) -> tuple[UpdateMeta, list[dict]]:
    """Every actor streams the trained folder ``uri`` from storage as ``version``; this process reads
    only the folder's manifest. Without a manifest the replicas' agreement is the only check.
    Returns the update's metadata (with the checksum the replicas measured when the folder had none)."""
    meta = folder_update(uri, version)
    reports = collect(RayReplicas(actors), len(actors), version, "load_weights_from", (meta,), timeout_s)
    record = meta.version
    if not record.checksum:  # a folder written by another tool: take what the replicas measured
        first = reports[0]
        record = WeightsVersion(version=version, kind=record.kind, uri=uri, checksum=first["received"],
                                num_bytes=first["num_bytes"], num_tensors=first["num_tensors"])
    return UpdateMeta(record, meta.lora), reports
