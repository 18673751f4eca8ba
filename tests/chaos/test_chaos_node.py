"""Chaos: a node of the cluster is removed mid-round; its generator replica comes back on a spare node
(placement group rescheduled, actor restarted) and the round finishes with the undisturbed winners and
losers. Runs in a child process with its own 4-node ``ray.cluster_utils.Cluster`` (the session's shared
cluster must keep its nodes); the reference is the chaos cases' undisturbed round (tests/chaos/conftest.py: the
same prompts, seeds and sizes), made on the shared cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import LOCAL_CONFIG, REPO

CHILD = textwrap.dedent("""
    import json, os, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster
    from anisora_ray.config import load_config
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.pairs.stage import run_pairs
    from tests.chaos.conftest import CHAOS, outcome, videos
    from tests.conftest import config_overrides
    import pathlib
    root, config, model_cache, manifest, reference = pathlib.Path(sys.argv[1]), *sys.argv[2:6]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 6, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=3, resources={"gen": 1}) for _ in range(3)]  # 2 replicas + a spare node
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    # Ray Data spreads its tasks over the nodes; here they stay on the head, which is not removed, so the victim's call
    # in flight is sent again by the pipeline's own retry (counted below), not by Ray Data re-running a forwarding task
    # that died with the node (not counted: that made the count 0 in one suite run)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    ray.data.DataContext.get_current().scheduling_strategy = NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)
    cfg = load_config(config, [*config_overrides(root, model_cache), *CHAOS, "generator.actor.resources={gen: 1}",
                               "generator.actor.num_cpus=0",  # like a GPU: the spare node's CPUs go to Ray Data
                               "generator.call_timeout_s=240",
                               "generator.placement_strategy=STRICT_SPREAD"])
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    target = replicas.placements()[0]["node_id"]
    victim = next(n for n in nodes if n.node_id == target)
    out = str(root / "disturbed")
    removed = []
    def busy():  # the victim (replica 0) holds a lease: a call of it is in flight, so the removal must resend it
        return ray.get(replicas.router.__ray_call__.remote(lambda router: router.load[0])) > 0
    def remove():
        while videos(out) < 4 or not busy():
            time.sleep(0.05)
        cluster.remove_node(victim)
        removed.append(time.time())
    threading.Thread(target=remove, daemon=True).start()
    began = time.perf_counter()
    result = run_pairs(cfg, manifest, out, replicas=replicas, progress=False)
    seconds = time.perf_counter() - began
    from anisora_ray.runtime import call_with_retries  # the round may end before the replica is back elsewhere
    after = call_with_retries(lambda: replicas.actors[0].placement.remote(), what="replica 0", retries=0)[0]["node_id"]
    print("RESULT " + json.dumps({"removed": bool(removed), "pairs": result.pairs, "retried": result.retried_candidates,
                                  "seconds": seconds, "same": outcome(out) == outcome(reference),
                                  "moved": after != target, "reported": replicas.placements()[0]["node_id"] == after}),
          flush=True)
    replicas.shutdown()
    ray.shutdown()
    cluster.shutdown()
""")


def test_a_node_removed_mid_round_its_replica_returns_elsewhere_and_the_round_finishes(chaos, tmp_path, model_cache):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = REPO
    reference = str(chaos["root"] / "undisturbed")  # PROMPTS pairs (checked there)
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), LOCAL_CONFIG, model_cache, chaos["manifest"],
                           reference], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-6000:]
    r = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"\nnode-removed: lost={6 - r['pairs']} duplicated=0 retried={r['retried']} seconds={r['seconds']:.1f}")
    assert r["removed"]
    assert r["pairs"] == 6 and r["same"]  # every prompt paired once, the same winners and losers
    assert r["moved"] and r["retried"] > 0  # the replica came back on the spare node and its work was sent again
    assert r["reported"]  # and placements() says so (the refresh routes by node: a stale one broke its host routes)
