"""Weight refresh: get trained weights to every replica and verify that each one loaded them.

Two transports, one check. ``publish_tensors`` packs named tensors (a trainer's live weights,
gathered bucket by bucket) into object-store buckets that replicas fetch one at a time;
``refresh_from_storage`` sends only the metadata of a trained folder and each replica streams the
folder from storage itself. Either way the process that calls it never holds the weights:
``refresh_actors`` checks that every replica reports the new version and the same checksum of
what it loaded. Any replica that fails, lags or disagrees makes the refresh raise
:class:`WeightsError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
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


def _collect(actors: list, version: int, call: Callable[[Any], Any], timeout_s: float) -> list[dict]:
    calls = [call(actor) for actor in actors]
    reports, failures = [], []
    for index, pending in enumerate(calls):
        try:
            reports.append(ray.get(pending, timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - every replica is checked before raising
            failures.append(f"replica {index}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    if failures:
        raise WeightsError(f"weights refresh to version {version} failed on {len(failures)} of "
                           f"{len(actors)} replica(s): " + "; ".join(failures))
    versions = {r["version"] for r in reports}
    loaded = {r["loaded"] for r in reports}
    if versions != {version} or len(loaded) != 1:
        raise WeightsError(f"replicas disagree after the refresh to version {version}: versions {versions}, "
                           f"{len(loaded)} distinct checksums")
    return reports


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
