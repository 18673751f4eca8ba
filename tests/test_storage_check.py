"""The start-up storage check on the shared 2-node mini-cluster, plus a node that sees another folder:
a `ray start` in a private mount namespace with a tmpfs over the output folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from anisora_ray.errors import StorageError
from anisora_ray.storage_check import CHECK_FOLDER, ID_PREFIX, check_storage
from tests.conftest import RAY, free_ports


def _alive():
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def test_every_node_sees_the_folder(ray_cluster, tmp_path, capsys):
    out = tmp_path / "out"
    start = time.monotonic()
    assert check_storage(str(out)) == len(_alive()) >= 2
    assert time.monotonic() - start < 30
    assert f"storage: {len(_alive())} node(s) see {out}" in capsys.readouterr().out
    assert not (out / CHECK_FOLDER).exists()  # cleaned up
    check_storage(str(out / "align" / "round-1"))  # a folder under one the same nodes shared: no second check
    assert capsys.readouterr().out == ""


def test_memory_url_is_per_process_and_fails_naming_the_nodes(ray_cluster):
    with pytest.raises(StorageError) as err:
        check_storage("memory://storage-check/out", progress=False)
    text = str(err.value)
    assert "memory://storage-check/out" in text and "memory:// lives in one process" in text
    for node in _alive():
        assert node["NodeID"][:ID_PREFIX] in text


def test_a_node_that_does_not_answer_in_time_is_named(ray_cluster, tmp_path):
    with pytest.raises(StorageError, match="did not run the check within 0s"):
        check_storage(str(tmp_path / "late"), timeout_s=0, progress=False)


@pytest.fixture
def blind_node(ray_cluster, tmp_path):
    """A node joined to the mini-cluster from a private mount namespace in which ``tmp_path/shared`` is a
    fresh tmpfs: it runs on this machine but does not see that folder. Yields (folder, its node record)."""
    if not os.path.exists(RAY):
        pytest.skip("no `ray` executable next to this Python")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("`unshare -m` is not permitted here (needs root or user namespaces): no node with its own mounts")
    shared = tmp_path / "shared"
    shared.mkdir()
    ip = ray_cluster.head_node.node_ip_address
    ports = free_ports(6)
    start = " ".join([RAY, "start", "--block", f"--address={ray_cluster.address}", f"--node-ip-address={ip}",
                      "--num-cpus=0", "--resources='{\"blind\": 1}'", f"--node-manager-port={ports[0]}",
                      f"--object-manager-port={ports[1]}", f"--metrics-export-port={ports[2]}",
                      f"--dashboard-agent-listen-port={ports[3]}", f"--dashboard-agent-grpc-port={ports[4]}",
                      f"--runtime-env-agent-port={ports[5]}", "--disable-usage-stats"])
    log = tmp_path / "blind-node.log"
    with open(log, "wb") as sink:
        node = subprocess.Popen(["unshare", "-m", "sh", "-c", f"mount -t tmpfs none {shared} && exec {start}"],
                                env={**os.environ, "RAY_AUTH_MODE": "disabled"}, start_new_session=True,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (found := [n for n in _alive() if n["Resources"].get("blind")]):
            if node.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the blind node did not join: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield shared, found[0]
    finally:
        os.killpg(node.pid, signal.SIGTERM)  # the raylet leaves the cluster on SIGTERM
        try:
            node.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait(timeout=10)
        deadline = time.monotonic() + 30  # gone before other tests schedule on the mini-cluster
        while any(n["Resources"].get("blind") for n in _alive()) and time.monotonic() < deadline:
            time.sleep(0.2)


def test_a_node_that_does_not_see_the_folder_fails_the_check_naming_it(blind_node):
    shared, node = blind_node
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        check_storage(str(shared), progress=False)
    seconds = time.monotonic() - start
    text = str(err.value)
    assert seconds < 30, seconds
    assert f"1 of {len(_alive())} Ray node(s) do not see run.output_dir = {str(shared)!r}" in text
    failing = [line for line in text.splitlines() if line.startswith("  - node ")]
    assert len(failing) == 1, text
    assert f"{node['NodeManagerAddress']} (id {node['NodeID'][:ID_PREFIX]})" in failing[0]
    assert "cannot read the driver's file" in failing[0] and str(shared) in failing[0]
    assert "mount the same shared storage" in text and "s3://" in text
    assert not (shared / CHECK_FOLDER).exists()
    print(json.dumps({"blind_node_check_seconds": round(seconds, 2)}))
