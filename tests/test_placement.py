"""Placement on a mini-cluster with fake GPUs: each replica gets a GPU of its own."""

import pytest

from anisora_ray.errors import ConfigError, ReplicaError
from anisora_ray.generation.replicas import GeneratorReplicas, bundle_for
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
    with pytest.raises(ReplicaError, match=r"'GPU': 64.0.*could not be placed"):
        GeneratorReplicas(cfg, "unused", ready_timeout_s=3)


def test_custom_resources_and_empty_request(make_config):
    cfg = make_config("generator.actor.resources={accel_v5: 2}", "generator.actor.num_gpus=1")
    assert bundle_for(cfg.generator.actor) == {"CPU": 1.0, "GPU": 1.0, "accel_v5": 2.0}
    with pytest.raises(ConfigError, match="asks for no resources"):
        bundle_for(make_config("generator.actor.num_cpus=0").generator.actor)
