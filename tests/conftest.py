"""Shared fixtures: one Ray mini-cluster per test session, a tiny pipeline, small configs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray's dashboard agents sample every worker process's stats every 5 s; with the suite's hundreds of short-lived
# workers on 2 cores that was ~4% of the CPUs. Nothing here reads those metrics: once a minute (test-only setting).
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_CONFIG = os.path.join(REPO, "configs", "local.yaml")

GAPO_CHILD_PRELUDE = """
import json, os, sys, numpy as np, torch
os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "@PORT@", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
import deepspeed
deepspeed.init_distributed("gloo")
from anisora_ray.config import load_config
from anisora_ray.gapo.engine import GapoWorker, deepspeed_config
from anisora_ray.io.video import write_video
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.data.demo import make_demo_set
from anisora_ray.data.manifest import read_manifest
out, config, root, arg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
rng = np.random.default_rng(0)
for name in ("w", "l"):
    write_video(rng.integers(0, 255, (9, 32, 32, 3), dtype=np.uint8), f"{out}/{name}.mp4", fps=8)
item = read_manifest(make_demo_set(f"{out}/demo", num_prompts=1, image_size=64, seed=0))[0]
row = {"prompt": item.prompt, "image_uri": item.image_uri, "winner_video_uri": f"{out}/w.mp4",
       "loser_video_uri": f"{out}/l.mp4", "winner_reward": 0.9, "loser_reward": 0.1, "winner_seed": 1, "loser_seed": 2}
"""


def gapo_child_script(port: int, body: str) -> str:
    """A ``python -c`` script running GapoWorkers in a world of one (gloo on ``port``), with argv (out dir, config,
    repo root, a JSON argument ``arg``): it writes a random 9x32x32 winner/loser pair and a demo image as ``row``,
    then runs ``body`` (dedented)."""
    import textwrap

    return GAPO_CHILD_PRELUDE.replace("@PORT@", str(port)) + textwrap.dedent(body)


RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def in_memory_update(version: int, tensors: list, kind: str, lora=None) -> tuple:
    """``load_weights``' arguments for named ``tensors`` as weights ``version`` (``full`` or ``lora`` with its
    ``LoraConfig``), packed in 1 MiB buckets as a refresh sends them."""
    from anisora_ray.types import WeightsVersion
    from anisora_ray.weights.state import pack_buckets, tensors_checksum
    from anisora_ray.weights.update import UpdateMeta

    record = WeightsVersion(version=version, kind=kind, uri="mem://", checksum=tensors_checksum(tensors),
                            num_bytes=0, num_tensors=len(tensors))
    return UpdateMeta(record, lora.model_dump() if lora else None), list(pack_buckets(tensors, 1 << 20))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_ray_head(log_path, dashboard: bool = False) -> tuple[subprocess.Popen, str, int]:
    """``ray start --head --block`` on loopback with free ports, in its own process group (so the whole head,
    GCS and raylet and their workers, can be killed at once), token auth off (a test-only setting: real clusters
    keep it on). Returns the process, the GCS address and the dashboard port, once the head answers."""
    if not os.path.exists(RAY):
        pytest.skip("no `ray` executable next to this Python")
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = free_ports(7)
    env = {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")},
           "RAY_AUTH_MODE": "disabled",
           "RAY_agent_register_timeout_ms": "120000"}  # a loaded 2-core machine starts the agent slowly
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", "--num-cpus=16", "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    address, deadline = f"127.0.0.1:{gcs}", time.time() + 120
    while subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            stop_ray_head(head)
            pytest.skip(f"no Ray head could start here: {open(log_path).read()[-2000:]}")
        time.sleep(1)
    return head, address, dash


def stop_ray_head(head: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the head's process group; SIGKILL what a graceful stop leaves after 5 s."""
    try:
        os.killpg(head.pid, sig)
        head.wait(timeout=5)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)


# The mini-cluster: two nodes, fake GPUs and logical CPUs (a scheduling budget, not cores).
NODES = [{"num_cpus": 8, "num_gpus": 4}, {"num_cpus": 8, "num_gpus": 4}]


def preemption_watchers() -> int:
    """Ray Train's preemption-watcher actors the cluster has seen (the GCS actor table keeps dead ones)."""
    from ray._private.state import actors

    return sum(a["ActorClassName"].endswith("PreemptionWatcher") for a in actors().values())


class ControllerEnv:
    """Reads, while a fit runs, the environment of each live Ray Train controller (``/proc/<pid>/environ``): what
    Ray Train took from the driver's environment. ``with ControllerEnv(keys) as seen:`` then ``seen`` maps each
    controller pid to its values of ``keys``. Controllers that existed before the block (an earlier fit's, which
    the actor table may still list as alive for a moment) are not read."""

    def __init__(self, keys: tuple[str, ...]):
        import threading

        self.keys, self.seen, self.stop = keys, {}, threading.Event()
        self.earlier: set[str] = set()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _controllers() -> dict:
        from ray._private.state import actors

        return {i: a for i, a in actors().items() if a["ActorClassName"].endswith("TrainController")}

    def _watch(self) -> None:
        while not self.stop.wait(0.2):
            for i, a in self._controllers().items():
                if i not in self.earlier and a["State"] == "ALIVE" and a["Pid"] not in self.seen:
                    try:
                        with open(f"/proc/{a['Pid']}/environ", "rb") as f:
                            env = dict(e.split("=", 1) for e in f.read().decode().split("\0") if "=" in e)
                    except OSError:
                        continue
                    self.seen[a["Pid"]] = {k: env.get(k) for k in self.keys}

    def __enter__(self) -> dict:
        self.earlier = set(self._controllers())
        self.thread.start()
        return self.seen

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    # no log monitor: nothing reads worker output here (log_to_driver=False), and tailing the session's hundreds
    # of worker log files took ~5% of a core for the whole suite
    quiet = {"include_dashboard": False, "include_log_monitor": False}
    cluster = Cluster(initialize_head=True, head_node_args=dict(NODES[0], **quiet))
    for node in NODES[1:]:
        cluster.add_node(**node, include_log_monitor=False)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="anisora-tests", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("model-cache"))


def config_overrides(root, model_cache: str) -> list[str]:
    """configs/local.yaml at test sizes, writing under ``root``."""
    return [
        f"run.output_dir={root / 'out'}",
        f"model.cache_dir={model_cache}",
        "generator.height=32",
        "generator.width=32",
        "generator.num_frames=9",
        "generator.num_inference_steps=3",
        "generator.candidates_per_prompt=3",
        "data.demo_prompts=3",
        "data.demo_image_size=64",
        "video.sample_size=32",
        "model.tiny.warm_start_steps=0",  # tests check mechanics on the cold tiny model (built in ~1 s) ...
        "model.tiny.vae_blocks=4", "model.tiny.vae_channels=8", "model.tiny.latent_channels=4",
        "model.tiny.attention_head_dim=16",  # ... at the smallest size (the demo's own size: test_guard_align)
        "gapo.steps=10",
        "loop.guard.action=warn",  # the cold tiny model moves at random: the guard measures and logs, never stops
    ]


@pytest.fixture
def make_config(tmp_path, model_cache):
    """``make_config(*overrides)``: configs/local.yaml at test sizes, writing under tmp_path."""
    from anisora_ray.config import load_config

    def make(*overrides: str):
        return load_config(LOCAL_CONFIG, [*config_overrides(tmp_path, model_cache), *overrides])

    return make


@pytest.fixture
def demo_manifest(tmp_path) -> str:
    from anisora_ray.data.demo import make_demo_set

    return make_demo_set(str(tmp_path / "demo"), num_prompts=3, image_size=64, seed=0)


GAPO_TRAIN = ("generator.replicas=1", "gapo.num_workers=2", "gapo.beta=500", "gapo.learning_rate=3e-3")


@pytest.fixture(scope="session")
def gapo_pairs(ray_cluster, tmp_path_factory, model_cache):
    """Pairs of 3 demo prompts from the real pairs pipeline, shared by the GAPO tests; ``make(*overrides)``
    gives the test config (2 GAPO workers) writing under the same root."""
    from anisora_ray.config import load_config
    from anisora_ray.data.demo import make_demo_set
    from anisora_ray.pairs.stage import run_pairs
    from anisora_ray.pairs.writer import pairs_table

    root = tmp_path_factory.mktemp("gapo")
    manifest = make_demo_set(str(root / "demo"), num_prompts=3, image_size=64, seed=0)

    def make(*overrides):
        return load_config(LOCAL_CONFIG, [*config_overrides(root, model_cache), *GAPO_TRAIN, *overrides])

    pairs = run_pairs(make(), manifest, str(root / "pairs"), progress=False)
    assert pairs.pairs >= 2
    return {"make": make, "table": pairs_table(str(root / "pairs")), "root": root, "manifest": manifest}
