"""Placement on a mini-cluster with fake GPUs: each replica gets a GPU of its own."""

import pytest

from anisora_ray.errors import ConfigError, ReplicaError
from anisora_ray.generation.replicas import GeneratorReplicas, bundle_for
from anisora_ray.loop.placement import check_cluster_fits, resource_demand
from anisora_ray.models.pipeline import resolve_pretrained


@pytest.mark.parametrize("replicas, strategy", [(3, "PACK"), (2, "STRICT_SPREAD")])
def test_replicas_land_on_distinct_gpus(ray_cluster, make_config, replicas, strategy):
    cfg = make_config(
        f"generator.replicas={replicas}",
        "generator.actor.num_gpus=1",
        "generator.actor.num_cpus=1",
        f"generator.placement_strategy={strategy}",
    )
    group = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        placements = group.placements()
        assert all(len(p["gpu_ids"]) == 1 for p in placements)
        gpus = {(p["node_id"], p["gpu_ids"][0]) for p in placements}
        assert len(gpus) == replicas  # N replicas on N distinct GPUs
        if strategy == "STRICT_SPREAD":
            assert len({p["node_id"] for p in placements}) == replicas
    finally:
        group.shutdown()


def test_unplaceable_request_fails_with_resources_named(ray_cluster, make_config):
    cfg = make_config("generator.replicas=2", "generator.actor.num_gpus=64")
    with pytest.raises(ReplicaError, match=r"'GPU': 64\}.*could not be placed"):
        GeneratorReplicas(cfg, "unused", ready_timeout_s=3)


def test_custom_resources_and_empty_request(make_config):
    cfg = make_config("generator.actor.resources={accel_v5: 2}", "generator.actor.num_gpus=1")
    assert bundle_for(cfg.generator.actor) == {"CPU": 1.0, "GPU": 1.0, "accel_v5": 2.0}
    assert cfg.generator.actor.ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"accel_v5": 2.0}}
    with pytest.raises(ConfigError, match="asks for no resources"):
        bundle_for(make_config("generator.actor.num_cpus=0").generator.actor)


def test_host_memory_is_reserved_with_each_replica_and_an_amount_no_cluster_has_is_named_in_gib(ray_cluster, make_config):
    import ray

    cfg = make_config("generator.replicas=2", "generator.actor.memory_gib=0.25")
    assert bundle_for(cfg.generator.actor) == {"CPU": 1.0, "memory": float(2**28)}
    assert resource_demand(cfg)["generator"]["memory"] == 2 * 2**28
    before = ray.available_resources().get("memory", 0.0)
    group = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        bundles = ray.util.placement_group_table(group.pg)["bundles"]
        assert [b["memory"] for b in bundles.values()] == [2**28, 2**28]
        assert before - ray.available_resources().get("memory", 0.0) >= 2 * 2**28 - 1  # Ray holds it for the replicas
    finally:
        group.shutdown()
    huge = make_config("generator.actor.memory_gib=100000", "ray.wait_for_resources_s=0")
    with pytest.raises(ConfigError, match=r"memory: needs 2e\+05 GiB, the cluster has [0-9.]+ GiB.*generator 0 GPU / 2 CPU / "
                                          r"2e\+05 GiB memory, reward 0 GPU / 6 CPU, trainer"):  # 2 replicas
        check_cluster_fits(huge)
