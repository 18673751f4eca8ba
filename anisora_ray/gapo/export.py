"""Trained weights out of a DeepSpeed engine one bucket at a time: to a folder in storage, or to live replicas.

Under ZeRO-3 every rank holds a slice of each parameter: the parameters of one bucket are gathered
on all ranks (a collective, so every rank walks the same buckets), rank 0 copies the gathered
bucket to the host and writes or publishes it, and the gathered copies are freed before the next
bucket. Beyond the model itself, a rank holds at most one bucket, whatever the model's size. Under
ZeRO-0/1/2 every rank has the whole module and only rank 0 walks it. Full fine-tuning exports the
transformer's state (bf16 when training in bf16); LoRA exports the ``gapo`` adapter only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from anisora_ray.config import LoraConfig
from anisora_ray.io import fs
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.folder import FolderWriter
from anisora_ray.weights.state import group_by_size

Chunk = list[tuple[str, torch.Tensor]]


def _partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def entries(module, lora: LoraConfig | None) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter or buffer) of what a refresh publishes, in sorted order of names."""
    if lora is not None:
        return sorted(lora_io.adapter_parameters(module).items())
    return sorted(module.state_dict(keep_vars=True).items())


def plan(engine, lora: LoraConfig | None, bucket_mb: float) -> list[Chunk]:
    """The exported tensors in buckets of about ``bucket_mb`` (full, gathered sizes); an adapter is one bucket."""
    bucket = int(bucket_mb * 2**20) if lora is None else 2**62  # an adapter is small: one gather
    return list(group_by_size(entries(engine.module, lora), bucket))


@contextlib.contextmanager
def gathered(tensors: list[torch.Tensor]):
    """The full values of ZeRO-3-partitioned ``tensors`` on every rank, inside the block."""
    params = list({id(t): t for t in tensors if _partitioned(t)}.values())
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def host_chunks(engine, chunks: list[Chunk], host: bool = True) -> Iterator[Chunk | None]:
    """``chunks`` (a :func:`plan`) with their full values, a bucket at a time, on rank 0 (``None`` on the
    others): on the host (``host``; copied from a device, views of host parameters otherwise) or where
    they live. A chunk is valid until the next one is requested (a ZeRO-3 gather is freed then).

    Every rank must exhaust this iterator under ZeRO-3 (the gathers are collectives)."""
    zero3 = engine.zero_optimization_stage() == 3
    rank0 = engine.global_rank == 0
    if not zero3 and not rank0:
        return
    for chunk in chunks:
        with gathered([t for _, t in chunk]):
            yield [(name, t.detach().to("cpu") if host else t.detach()) for name, t in chunk] if rank0 else None


def _writer(engine, uri: str, lora: LoraConfig | None, shards: int, fingerprint: bool) -> FolderWriter:
    if lora is not None:
        return FolderWriter(uri, "lora", prefix=lora_io.PREFIX, file_name=lora_io.WEIGHTS_NAME, fingerprint=fingerprint)
    return FolderWriter(uri, "full", num_shards=shards, fingerprint=fingerprint)


def _close(writer: FolderWriter, engine, uri: str, lora: LoraConfig | None, extra: dict | None) -> dict:
    if lora is not None:
        lora_io.write_lora_config(lora, uri)
    else:
        fs.write_bytes(fs.join(uri, "config.json"), engine.module.to_json_string().encode())
    return writer.close(extra)


def export_weights(engine, uri: str, lora: LoraConfig | None, bucket_mb: float = 512.0, extra: dict | None = None,
                   fingerprint: bool = False) -> dict | None:
    """Write the trained weights to the folder ``uri`` (any fsspec URL), shard by shard; every rank
    calls it, rank 0 writes and returns the folder's manifest (``None`` on the other ranks). With
    ``fingerprint`` the manifest also holds ``checksum_fp`` (scheme ``fp``, what GPU routes verify)."""
    chunks = plan(engine, lora, bucket_mb)
    writer = _writer(engine, uri, lora, len(chunks), fingerprint) if engine.global_rank == 0 else None
    source = host_chunks(engine, chunks)
    try:
        for chunk in source:
            if writer is not None:
                writer.write_shard(chunk)
    finally:
        for _ in source:  # after a failed write: the other ranks wait in the remaining gathers
            pass
    return None if writer is None else _close(writer, engine, uri, lora, extra)


def write_through(source: Iterator[Chunk], write, stream):
    """Feed ``stream`` the chunks of ``source``, each one ``write``-n first; returns ``(stream's result or None,
    its error or None)``. Whatever the stream does, every chunk is written and ``source`` is exhausted (its
    gathers are collectives); a failed write is raised once ``source`` is exhausted."""
    failed_write: list[BaseException] = []

    def tee():
        for chunk in source:
            try:
                write(chunk)
            except BaseException as exc:
                failed_write.append(exc)
                raise
            yield chunk

    chunks = tee()
    result = error = None
    try:
        result = stream(chunks)
    except Exception as exc:  # noqa: BLE001 - the stream broke off: the rest is still written below
        error = exc
    finally:
        try:
            if not failed_write:
                for _ in chunks:  # the chunks the stream did not ask for (a write may fail here too)
                    pass
        except BaseException:  # noqa: BLE001 - recorded by tee, raised below once every gather is done
            if not failed_write:
                raise
        for _ in source:  # after a failed write: the other ranks wait in the remaining gathers
            pass
    if failed_write:
        raise failed_write[0]
    return result, error


def export_and_stream(engine, uri: str, lora: LoraConfig | None, bucket_mb: float, extra: dict | None, actors: list,
                      nodes: list[str] | None, version: int, transport: str = "auto", fingerprint: bool = False):
    """:func:`export_weights` and :func:`stream_live` in one walk over the weights (one set of ZeRO-3 gathers):
    rank 0 writes each gathered bucket as a shard, then streams it to the replicas. Returns
    ``(manifest, (UpdateMeta, reports) or None, stream error or None)`` on rank 0, ``None`` on the others.
    A failed stream leaves the folder whole (the caller refreshes from storage); a failed write raises."""
    from anisora_ray.weights.refresh import stream_update  # Ray: only where replicas are refreshed

    chunks = plan(engine, lora, bucket_mb)
    source = host_chunks(engine, chunks, host=False)
    if engine.global_rank != 0:
        for _ in source:
            pass
        return None
    writer = _writer(engine, uri, lora, len(chunks), fingerprint)
    streamed, error = write_through(
        source, lambda chunk: writer.write_shard([(name, t.detach().cpu()) for name, t in chunk]),
        lambda tee: stream_update(actors, tee, version, "lora" if lora else "full", uri=uri,
                                  lora=lora.model_dump() if lora else None, nodes=nodes, transport=transport))
    return _close(writer, engine, uri, lora, extra), streamed, error


def stream_live(engine, actors: list, nodes: list[str] | None, version: int, lora: LoraConfig | None, bucket_mb: float,
                uri: str = "", transport: str = "auto"):
    """Rank 0 streams the live weights to the replica ``actors`` as ``version`` (``weights.refresh.stream_update``
    over ``transport``: from a GPU through CUDA IPC or NCCL, from the host through shared memory or the object store);
    returns ``(UpdateMeta, reports)`` on rank 0 and ``None`` on the others (which take part in the gathers)."""
    from anisora_ray.weights.refresh import stream_update  # Ray: only where replicas are refreshed

    chunks = host_chunks(engine, plan(engine, lora, bucket_mb), host=False)
    if engine.global_rank != 0:
        for _ in chunks:
            pass
        return None
    try:
        return stream_update(actors, chunks, version, "lora" if lora else "full", uri=uri,
                             lora=lora.model_dump() if lora else None, nodes=nodes, transport=transport)
    finally:  # also after a failure: the other ranks wait in the remaining gathers
        for _ in chunks:
            pass
