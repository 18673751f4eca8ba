"""Chaos, before any work: an output location that cannot be written stops the job at once, naming the
setting, before Ray starts or a model loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tests.conftest import LOCAL_CONFIG, REPO


def test_an_unwritable_output_location_fails_before_ray_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")  # a file where the output folder should be: no write can succeed below it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "anisora_ray.cli", "align", "--config", LOCAL_CONFIG,
                           "--set", f"run.output_dir={blocker}/out"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=120)
    seconds = time.perf_counter() - began
    print(f"\nunwritable-output: lost=0 duplicated=0 retried=0 seconds={seconds:.1f}")
    assert done.returncode != 0
    assert "run.output_dir" in done.stderr and "is not writable" in done.stderr, done.stderr[-2000:]
    assert "Started a local Ray" not in done.stderr + done.stdout  # nothing was started
    assert not os.path.exists(str(blocker) + "/out")


def test_a_cluster_without_the_resources_the_config_asks_for_fails_within_the_wait(ray_cluster, make_config):
    import pytest

    from anisora_ray.errors import ConfigError
    from anisora_ray.loop.align import run_alignment

    cfg = make_config("generator.replicas=10", "generator.actor.num_gpus=1", "ray.wait_for_resources_s=3")
    began = time.perf_counter()
    with pytest.raises(ConfigError) as caught:  # the mini-cluster has 8 GPUs; 10 replicas + 6 reward actors ask for more
        run_alignment(cfg, progress=False, root=REPO)
    seconds = time.perf_counter() - began
    print(f"\nmissing-resources: lost=0 duplicated=0 retried=0 seconds={seconds:.1f}")
    message = str(caught.value)
    assert "GPU: needs 10, the cluster has 8" in message and "generator 10 GPU" in message
    assert "ray.wait_for_resources_s" in message and seconds < 30


def test_an_actor_no_single_node_can_hold_fails_within_the_wait_though_the_totals_suffice(ray_cluster, make_config):
    import pytest

    from anisora_ray.errors import ConfigError
    from anisora_ray.loop.align import run_alignment

    # The cluster's totals (8 GPUs) hold one 5-GPU replica, but no node has 5 (4 each): a placement group would wait forever.
    cfg = make_config("generator.replicas=1", "generator.actor.num_gpus=5", "ray.wait_for_resources_s=3")
    began = time.perf_counter()
    with pytest.raises(ConfigError) as caught:
        run_alignment(cfg, progress=False, root=REPO)
    seconds = time.perf_counter() - began
    print(f"\nno-node-fits: lost=0 duplicated=0 retried=0 seconds={seconds:.1f}")
    message = str(caught.value)
    assert "no node of the cluster can hold one generator.actor ({'CPU': 1, 'GPU': 5})" in message, message
    assert "the largest node offers {'CPU': 8, 'GPU': 4}" in message and seconds < 30
