"""Reward actors on the mini-cluster: placement per dimension, and `anisora-ray score` end to end."""

import math

import pytest

from anisora_ray.cli import main
from anisora_ray.io import fs
from anisora_ray.reward.actors import RewardActors
from anisora_ray.types import DIMENSIONS, ScoredCandidate
from tests.conftest import LOCAL_CONFIG


def test_six_dimensions_land_on_six_distinct_gpus(ray_cluster, make_config):
    import ray

    cfg = make_config(*[f"reward.dimensions.{d}.actor.num_gpus=1" for d in DIMENSIONS],
                      "reward.dimensions.character.actor.memory_gib=0.5")
    actors = RewardActors(cfg.reward)
    try:
        # the host memory the character actor asked for is held for it
        assert ray.available_resources().get("memory", 0.0) <= ray.cluster_resources()["memory"] - 2**29
        placements = actors.placements()
        assert sorted(p["dimension"] for p in placements) == sorted(DIMENSIONS)
        assert all(len(p["gpu_ids"]) == 1 for p in placements)
        assert len({(p["node_id"], p["gpu_ids"][0]) for p in placements}) == 6
    finally:
        actors.shutdown()


def test_pools_that_cannot_all_be_placed_are_all_removed(ray_cluster, make_config):
    import time

    import ray

    # one dimension asks for a resource no node has: the others, already placed, do not stay behind holding CPUs
    def settled(deadline_s: float) -> float:  # the CPUs free once what earlier tests ended has been released
        total, deadline = ray.cluster_resources()["CPU"], time.monotonic() + deadline_s
        while ray.available_resources().get("CPU", 0.0) < total and time.monotonic() < deadline:
            time.sleep(0.2)
        return ray.available_resources().get("CPU", 0.0)

    free = settled(30)
    cfg = make_config("reward.dimensions.character.actor.resources={nonesuch: 1}",
                      *[f"reward.dimensions.{d}.actor.num_cpus=2" for d in DIMENSIONS])
    with pytest.raises(ray.exceptions.GetTimeoutError) as failed:  # its traceback (kept, as pytest keeps a failure's)
        RewardActors(cfg.reward, timeout_s=3)                        # holds the half-built pools' handles
    assert settled(20) >= free, failed.traceback[-1]  # ours released (others may have, too)


@pytest.mark.parametrize("broken", ["truncated"])
def test_score_command_scores_all_and_quarantines_a_corrupt_clip(ray_cluster, tmp_path, model_cache, broken):
    common = ["--config", LOCAL_CONFIG, "--quiet", "--set", f"run.output_dir={tmp_path}",
              "--set", f"model.cache_dir={model_cache}", "--set", "generator.height=32", "--set", "generator.width=32",
              "--set", "generator.num_inference_steps=2", "--set", "data.demo_prompts=2",
              "--set", "data.demo_image_size=64", "--set", "generator.candidates_per_prompt=3",
              "--set", "reward.batch_size=2", "--set", "model.tiny.warm_start_steps=0"]
    assert main(["generate", *common]) == 0
    candidates_uri = str(tmp_path / "generate" / "candidates.parquet")
    victim = sorted((tmp_path / "generate" / "videos").rglob("*.mp4"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])

    out = str(tmp_path / "scores.parquet")
    assert main(["score", *common, "--candidates", candidates_uri, "--out", out]) == 0
    table = fs.read_table(out)
    for name in DIMENSIONS:
        assert name in table.column_names and f"{name}_raw" in table.column_names
    scored = ScoredCandidate.from_table(table)
    assert len(scored) == 6
    bad = [s for s in scored if s.video_uri == str(victim)]
    good = [s for s in scored if s.video_uri != str(victim)]
    assert len(bad) == 1 and "VideoDecodeError" in bad[0].quarantine_reason and str(victim) in bad[0].quarantine_reason
    assert math.isnan(bad[0].reward) and bad[0].scores == {}
    for s in good:
        assert s.quarantine_reason is None
        assert 0.0 <= s.reward <= 1.0
        assert set(s.scores) == set(DIMENSIONS) and all(0.0 <= v <= 1.0 for v in s.scores.values())
        assert set(s.raw_scores) == set(DIMENSIONS)
