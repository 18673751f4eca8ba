"""Thin helpers over fsspec so that every URL (local path, memory://, s3://, gs://) works alike."""

from __future__ import annotations

import glob
import os
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

# what reading one path raises whatever the storage's health, so the item's own fault (a storage outage is not):
# a folder where a file should be, no read permission, an unknown protocol
ITEM_READ_ERRORS = (IsADirectoryError, NotADirectoryError, PermissionError, ValueError)


def is_url(uri: str) -> bool:
    return "://" in uri


def normalize(uri: str) -> str:
    """Absolute local path (``~`` expanded; ``file://`` removed, so local writes stay atomic) or the URL unchanged."""
    local = uri.removeprefix("file://")
    return uri if is_url(local) else os.path.abspath(os.path.expanduser(local))


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def url_to_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(normalize(uri))
    return fs, path


def exists(uri: str) -> bool:
    fs, path = url_to_fs(uri)
    return fs.exists(path)


def literal(fs, path: str) -> str:
    """``path`` as fsspec's ``rm`` / ``expand_path`` should take it: object stores and memory expand ``[ ] * ?`` as
    globs (``run[1]`` would delete ``run1``), the local filesystem does not."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if {"file", "local"} & set(protocols) else glob.escape(path)


def check_writable(uri: str, what: str = "run.output_dir") -> str:
    """Fail early, naming ``what``, when ``uri`` cannot be written (a file in the way, no permission,
    a full disk, a bucket that refuses): before any model is loaded or any GPU is held."""
    from anisora_ray.errors import ConfigError

    probe = join(uri, f".anisora-write-probe-{os.getpid()}")
    try:
        write_bytes(probe, b"ok")
        fs, path = url_to_fs(probe)
        fs.rm(literal(fs, path))
    except Exception as exc:  # noqa: BLE001 - whatever the filesystem says, said with the setting's name
        raise ConfigError(f"{what} = {uri!r} is not writable: {type(exc).__name__}: {exc}") from None
    return uri


def makedirs(uri: str) -> None:
    fs, path = url_to_fs(uri)
    fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str) -> bytes:
    fs, path = url_to_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``; local files (``file://`` too) are written to a temp name and renamed (atomic)."""
    uri = normalize(uri)
    fs, path = url_to_fs(uri)
    parent = posixpath.dirname(path) if is_url(uri) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_url(uri):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written file left behind to hold the space
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_table(table: pa.Table, uri: str) -> None:
    """Write a parquet file at ``uri`` (any fsspec URL)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def read_table(uri: str) -> pa.Table:
    fs, path = url_to_fs(uri)
    return pq.read_table(path, filesystem=fs)


def size(uri: str) -> int:
    """Bytes under ``uri`` (a file or a folder, recursively); 0 when it does not exist."""
    fs, path = url_to_fs(uri)
    if not fs.exists(path):
        return 0
    return int(fs.du(path, total=True)) if fs.isdir(path) else int(fs.size(path))


def remove(uri: str) -> int:
    """Delete a file or a folder with everything under it; returns the bytes freed (0: nothing there)."""
    fs, path = url_to_fs(uri)
    freed = size(uri)
    if fs.exists(path):
        fs.rm(literal(fs, path), recursive=True)
    return freed
