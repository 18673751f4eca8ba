"""Weight refresh: publish trained weights into the object store and verify every replica loaded them.

``publish`` reads a trained folder (a full transformer saved with ``save_pretrained``, or a LoRA
adapter), packs its tensors into buckets and ``ray.put``s each one; ``refresh_actors`` asks every
replica to ``load_weights(meta, bucket_refs)`` (a replica fetches one bucket at a time) and
checks that each one reports the new version and the same checksum of what it loaded. Any
replica that fails, lags or disagrees makes the refresh raise :class:`WeightsError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights.state import Checksum, pack_buckets
from anisora_ray.weights.update import UpdateMeta, read_folder


@dataclass
class WeightsUpdate:
    meta: UpdateMeta
    buckets: list[Any] = field(default_factory=list)  # ray.ObjectRef of weights.state.Bucket

    @property
    def version(self) -> int:
        return self.meta.version.version


def publish(uri: str, version: int, bucket_mb: float = 256.0) -> WeightsUpdate:
    """Put the weights of folder ``uri`` (full transformer or LoRA adapter) into the object store."""
    kind, lora_config, tensors = read_folder(uri)
    lora = lora_config.model_dump() if lora_config else None
    checksum, count, refs, nbytes = Checksum(), 0, [], 0

    def counted():
        nonlocal count
        for name, tensor in tensors:
            if tensor.is_floating_point() and not bool(torch.sum(tensor, dtype=torch.float64).isfinite()):  # NaN/inf propagate
                raise WeightsError(f"{uri}: tensor {name!r} has non-finite values; refusing to publish diverged weights")
            checksum.update(name, tensor)
            count += 1
            yield name, tensor

    for bucket in pack_buckets(counted(), int(bucket_mb * 2**20)):
        refs.append(ray.put(bucket))
        nbytes += bucket.nbytes
    record = WeightsVersion(version=version, kind=kind, uri=uri, checksum=checksum.hexdigest(),
                            num_bytes=nbytes, num_tensors=count)
    return WeightsUpdate(UpdateMeta(record, lora), refs)


def refresh_actors(actors: list, update: WeightsUpdate, timeout_s: float = 1800.0) -> list[dict]:
    """Load ``update`` on every actor (in parallel) and verify versions and checksums agree."""
    calls = [actor.load_weights.remote(update.meta, update.buckets) for actor in actors]
    reports, failures = [], []
    for index, call in enumerate(calls):
        try:
            reports.append(ray.get(call, timeout=timeout_s))
        except Exception as exc:  # noqa: BLE001 - every replica is checked before raising
            failures.append(f"replica {index}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    if failures:
        raise WeightsError(f"weights refresh to version {update.version} failed on {len(failures)} of "
                           f"{len(actors)} replica(s): " + "; ".join(failures))
    versions = {r["version"] for r in reports}
    loaded = {r["loaded"] for r in reports}
    if versions != {update.version} or len(loaded) != 1:
        raise WeightsError(f"replicas disagree after the refresh to version {update.version}: versions {versions}, "
                           f"{len(loaded)} distinct checksums")
    return reports
