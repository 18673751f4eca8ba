"""Start-up check that every Ray node sees the output folder: one folder, not one local disk per node.

The driver writes a token under ``<output>/.storage-check/<token>/``; one 0-CPU task pinned to each
alive node reads it and writes a file named after its node id, which the driver reads back. A node
that fails any step is named in one :class:`StorageError`, before any model loads or GPU is held
(otherwise replicas on two nodes write videos the readers on the other node quarantine).
"""

from __future__ import annotations

import logging
import secrets
import time

import ray

from anisora_ray.errors import StorageError
from anisora_ray.io import fs
from anisora_ray.runtime import first_line

log = logging.getLogger(__name__)

CHECK_FOLDER = ".storage-check"
ID_PREFIX = 12  # characters of a node id in messages
_passed: dict[frozenset[str], list[str]] = {}  # alive node set -> folders they were seen to share


@ray.remote(num_cpus=0, max_retries=0)
def _probe(token_uri: str, token: bytes, node_uri: str) -> str | None:
    """On one node: read the driver's token, write this node's file; what failed, or None."""
    try:
        seen = fs.read_bytes(token_uri)
    except Exception as exc:  # noqa: BLE001 - reported with the node's name by the driver
        return f"cannot read the driver's file {token_uri}: {type(exc).__name__}: {first_line(exc)}"
    if seen != token:
        return f"reads other content at {token_uri} (another folder of the same name)"
    try:
        fs.write_bytes(node_uri, token + ray.get_runtime_context().get_node_id().encode())
    except Exception as exc:  # noqa: BLE001
        return f"cannot write {node_uri}: {type(exc).__name__}: {first_line(exc)}"
    return None


def _covered(uri: str, folders: list[str]) -> bool:
    return any(uri == f or uri.startswith(f.rstrip("/") + "/") for f in folders)


def _advice(uri: str) -> str:
    if fs.is_url(uri) and uri.startswith("memory://"):
        return ("memory:// lives in one process: set run.output_dir to a folder on shared storage or a URL "
                "every node reaches (s3://bucket/prefix, gs://...)")
    if fs.is_url(uri):
        return "give every node access to that URL (credentials, network, the fsspec backend installed)"
    return (f"mount the same shared storage at {uri} (or a folder above it) on every node: NFS / EFS, FSx for "
            "Lustre, a ReadWriteMany volume on Kubernetes (see cluster/README.md, 'Shared storage'); or set "
            "run.output_dir to an fsspec URL every node reaches (s3://bucket/prefix, gs://...)")


def check_storage(uri: str, what: str = "run.output_dir", *, timeout_s: float = 60.0, progress: bool = True) -> int:
    """Check that every alive Ray node reads what the driver writes under ``uri`` and the driver reads
    what each node writes there; returns the number of nodes. Raises :class:`StorageError` naming every
    failing node (IP, node id prefix), the folder, what failed and how to fix it. Repeated calls for a
    folder under one the same nodes already shared return at once."""
    uri = fs.normalize(uri)
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    key = frozenset(nodes)
    if _covered(uri, _passed.get(key, [])):
        return len(nodes)
    start = time.monotonic()
    token = secrets.token_hex(16)
    folder = fs.join(uri, CHECK_FOLDER, token)
    token_uri = fs.join(folder, "driver")
    try:
        fs.write_bytes(token_uri, token.encode())
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"{what} = {uri!r}: the driver cannot write {token_uri}: {type(exc).__name__}: "
                           f"{first_line(exc)}") from None
    try:
        failures = _run_probes(nodes, token.encode(), token_uri, folder, timeout_s)
    finally:
        _remove(fs.join(uri, CHECK_FOLDER), folder)
    if failures:  # a node that left the cluster meanwhile is Ray's fault tolerance's business, not storage
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        failures = {n: reason for n, reason in failures.items() if n in alive}
    if failures:
        lines = "\n".join(f"  - node {nodes[n]} (id {n[:ID_PREFIX]}): {why}" for n, why in sorted(failures.items()))
        raise StorageError(f"{len(failures)} of {len(nodes)} Ray node(s) do not see {what} = {uri!r} as the driver "
                           "does (their actors would write where the others cannot read):\n"
                           f"{lines}\nFix: {_advice(uri)}")
    _passed.setdefault(key, []).append(uri)
    line = f"storage: {len(nodes)} node(s) see {uri} ({time.monotonic() - start:.1f}s)"
    log.info(line)
    if progress:
        print(line, flush=True)
    return len(nodes)


def _run_probes(nodes: dict[str, str], token: bytes, token_uri: str, folder: str, timeout_s: float) -> dict[str, str]:
    """One pinned probe per node; {node id: what failed}."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    refs = {node: _probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(token_uri, token, fs.join(folder, node)) for node in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    failures = {}
    for node, ref in refs.items():
        if ref not in done:
            failures[node] = f"did not run the check within {timeout_s:g}s (no worker could start there?)"
            try:
                ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001 - already finished or gone
                log.debug("could not cancel the check on %s: %s", node, exc)
            continue
        try:
            reason = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - the node died, or the task could not be placed
            reason = f"the check task failed: {type(exc).__name__}: {first_line(exc)}"
        if reason is None:
            node_uri = fs.join(folder, node)
            try:
                if fs.read_bytes(node_uri) != token + node.encode():
                    reason = f"the driver reads other content in {node_uri}"
            except Exception as exc:  # noqa: BLE001
                reason = (f"the driver cannot read {node_uri}, which the node wrote: "
                          f"{type(exc).__name__}: {first_line(exc)}")
        if reason is not None:
            failures[node] = reason
    return failures


def _remove(parent: str, folder: str) -> None:
    """Delete this check's folder, and the parent when no other check is using it."""
    try:
        fsys, path = fs.url_to_fs(folder)
        fsys.rm(fs.literal(fsys, path), recursive=True)
        fsys, path = fs.url_to_fs(parent)
        if not fsys.ls(path):
            fsys.rmdir(path)
    except Exception as exc:  # noqa: BLE001 - leftovers are harmless: a few bytes in a hidden folder
        log.debug("could not remove %s: %s", folder, exc)
