"""The replica side of every refresh path, as a mixin (no Ray): whole updates, streamed updates, folders.

A class that holds a model to refresh (the generator, a benchmark's stand-in) mixes this in and
implements :meth:`WeightsReceiver.receiving_module`. It gets the methods a sender calls:
``load_weights`` (a whole update), ``begin_update`` / ``load_part`` / ``commit_update`` (streamed
bucket by bucket from the object store, a same-node shared-memory slot, a GPU slot opened through
CUDA IPC, or a broadcast group joined with ``join_weights_group``), ``load_weights_from``
(a folder in storage), and ``check_complete``, which a user of the model calls before running it.
The version moves only once every checksum agrees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from anisora_ray.errors import WeightsError
from anisora_ray.types import WeightsVersion
from anisora_ray.weights import cuda_ipc
from anisora_ray.weights.collective import CollectiveBucket, GroupSpec, WeightsGroup
from anisora_ray.weights.shared import SharedBucket, bucket_items, release_unused
from anisora_ray.weights.state import Bucket, bucket_tensors
from anisora_ray.weights.update import UpdateLoader, UpdateMeta, read_folder

log = logging.getLogger(__name__)


class WeightsReceiver:
    """Versioned, verified weight loading for a model that replicas serve."""

    replica_id: str = ""
    _weights_version: int = 0
    _weights_checksum: str = ""
    _incoming: UpdateLoader | None = None
    _weights_group: WeightsGroup | None = None

    def receiving_module(self):
        """The module the weights go into (the transformer)."""
        raise NotImplementedError

    def compute_device(self):
        """Where the module runs, so where a broadcast group receives (an offloaded module rests on the host)."""
        return next(self.receiving_module().parameters()).device

    def before_update(self, kind: str) -> bool:
        """Called before an update of ``kind`` is copied in (a quantized replica gives back plain weights); returns
        whether the module now differs from its loaded version (then it is blocked until the update commits)."""
        return False

    def after_update(self, kind: str) -> None:
        """Called once an update of ``kind`` is verified, before its version is taken (a quantized replica
        quantizes the new weights again and checks them)."""

    @property
    def weights_version(self) -> int:
        return self._weights_version

    def get_weights_version(self) -> int:
        return self._weights_version

    def weights_state(self) -> dict:
        return {"replica_id": self.replica_id, "version": self._weights_version, "checksum": self._weights_checksum}

    def check_complete(self) -> None:
        """Raise :class:`WeightsError` while the module holds part of an update (a mix of versions)."""
        if self._incoming is not None and self._incoming.partial:
            raise WeightsError(f"replica {self.replica_id} holds part of weights version {self._incoming.version}; "
                               f"it runs again once that update is committed or replaced")

    def load_weights(self, meta: UpdateMeta, buckets: Iterable[Bucket]) -> dict:
        """Load a whole published update (full transformer or LoRA adapter), verified by checksum."""
        return self._load(meta, bucket_tensors(buckets), "the object store")

    def load_weights_from(self, meta: UpdateMeta) -> dict:
        """Load the weights folder ``meta.version.uri`` straight from storage (one shard at a time)."""
        kind, _, tensors = read_folder(meta.version.uri)
        if kind != meta.version.kind:
            raise WeightsError(f"{meta.version.uri} holds {kind} weights, the update says {meta.version.kind}")
        return self._load(meta, tensors, "storage")

    def weights_gpus(self) -> list[str]:
        """UUIDs of the GPUs this replica sees (a sender on one of them reaches it through CUDA IPC)."""
        return cuda_ipc.visible_gpu_uuids()

    def join_weights_group(self, spec: GroupSpec, rank: int) -> None:
        """Join a sender's broadcast group (leaving the previous one); returns once the whole group has joined."""
        self._leave_weights_group()
        self._weights_group = WeightsGroup(spec, rank, self.compute_device())

    def begin_update(self, version: int, kind: str, lora: dict | None = None, scheme: str = "xxh3") -> None:
        """Start loading ``version`` part by part (:meth:`load_part`, then :meth:`commit_update`), verified with
        checksum ``scheme`` (``fp`` when the sender stages on a GPU)."""
        self._incoming = self._start(version, kind, lora, scheme)

    def _parts(self, bucket):
        if isinstance(bucket, CollectiveBucket):
            if self._weights_group is None:
                raise WeightsError(f"replica {self.replica_id}: a group bucket arrived before joining a weights group")
            return list(self._weights_group.receive(bucket))  # taken out of the group first, whatever follows
        if isinstance(bucket, cuda_ipc.DeviceBucket):
            return cuda_ipc.device_tensors(bucket)
        return bucket_items(bucket)

    def load_part(self, version: int, bucket: Bucket | SharedBucket | CollectiveBucket | cuda_ipc.DeviceBucket) -> int:
        """Copy one bucket of the update begun as ``version`` into the module; returns its bytes. A group's
        bucket is received before anything is checked: every member takes part in every broadcast."""
        parts = self._parts(bucket)
        if self._incoming is None or self._incoming.version != version:
            begun = self._incoming.version if self._incoming else None
            raise WeightsError(f"replica {self.replica_id}: a part of weights version {version} arrived, "
                               f"but the update in progress is {begun}")
        self._incoming.add(parts)
        return bucket.nbytes

    def commit_update(self, record: WeightsVersion) -> dict:
        """Verify the streamed update against ``record`` and make it the weights version."""
        if self._incoming is None:
            raise WeightsError(f"replica {self.replica_id}: commit of weights version {record.version} without an update")
        report = self._incoming.finish(record)
        self._settle(record.kind)
        self._incoming = None
        self._leave_weights_group()  # each update forms a group of its own: its buffer (a bucket's size) goes now
        release_unused()
        cuda_ipc.release_unused()
        return self._loaded(record, report, "a live trainer")

    def _leave_weights_group(self) -> None:
        if self._weights_group is not None:
            self._weights_group.close()
            self._weights_group = None

    def in_weights_group(self) -> bool:
        return self._weights_group is not None

    def _start(self, version: int, kind: str, lora: dict | None, scheme: str = "xxh3") -> UpdateLoader:
        left = self._incoming  # an update that did not commit (replaced by this one)
        base_mixed = left is not None and (left.base_mixed or (left.partial and left.kind == "full"))
        if base_mixed and kind != "full":
            raise WeightsError(f"replica {self.replica_id}: its base holds part of a full update (version {left.version} "
                               f"or before); a {kind} update leaves the base as it is, so a whole full update (or a "
                               f"restart) must replace it first")
        try:
            altered = self.before_update(kind)
            loader = UpdateLoader(self.receiving_module(), version, kind, lora, self._weights_version, scheme)
        except Exception:
            self.after_update(kind)  # refused (or failed half-way) before anything was copied: as it was
            raise
        # blocked until this update (or another) commits, whether or not a part ever arrives (a stream that stops
        # before its first part), when the module is already not the loaded version's: an update left half-way (still
        # so), layers the hook altered (dequantized FP8), or an adapter this LoRA update switched on (over a full
        # update's base it may be another version's)
        loader.partial = bool(altered) or (left is not None and left.partial) or kind == "lora"
        loader.base_mixed = base_mixed
        return loader

    def _load(self, meta: UpdateMeta, tensors, source: str) -> dict:
        record = meta.version  # a whole update replaces one left half-way; a failed one blocks the model too
        self._incoming = self._start(record.version, record.kind, meta.lora)
        self._incoming.add(tensors)
        report = self._incoming.finish(record)
        self._settle(record.kind)
        self._incoming = None
        return self._loaded(record, report, source)

    def _settle(self, kind: str) -> None:
        """``after_update``; if it fails, the module stays blocked (``check_complete`` raises) as after a broken
        transfer, until another update is committed."""
        try:
            self.after_update(kind)
        except Exception:
            self._incoming.partial = True
            raise

    def _loaded(self, record: WeightsVersion, report: dict, source: str) -> dict:
        self._weights_version = record.version
        self._weights_checksum = report["loaded"]
        log.info("replica %s loaded weights version %d (%s, %.1f MB from %s in %.2fs)", self.replica_id,
                 self._weights_version, record.kind, report["num_bytes"] / 1e6, source, report["seconds"])
        return {**report, "replica_id": self.replica_id}
