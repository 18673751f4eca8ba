"""Generator replicas on the Ray mini-cluster: real Ray actors, real diffusers, tiny sizes."""

import os

import numpy as np
import pytest

from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.generation.stage import generate_candidates
from anisora_ray.io import fs
from anisora_ray.io.video import read_all_frames, read_clip
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.types import Candidate, GenerationRequest, PromptItem, QuarantineRecord


@pytest.fixture
def replicas(ray_cluster, make_config):
    cfg = make_config("generator.replicas=2", "generator.prompts_per_call=2")
    group = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    yield cfg, group
    group.shutdown()


def test_k_candidates_per_prompt_distinct_and_reproducible(replicas, demo_manifest, tmp_path):
    cfg, group = replicas
    items = read_manifest(demo_manifest)
    ghost = PromptItem("ghost", "a missing image", str(tmp_path / "nope.png"))
    result = generate_candidates(cfg, [*items, ghost], str(tmp_path / "round0"), group, progress=False)
    k = cfg.generator.candidates_per_prompt

    # K candidates for every valid prompt, distinct seeds, both replicas used, version 0
    by_prompt = {}
    for c in result.candidates:
        by_prompt.setdefault(c.prompt_id, []).append(c)
    assert sorted(by_prompt) == sorted(i.prompt_id for i in items)
    for cands in by_prompt.values():
        assert len(cands) == k and len({c.seed for c in cands}) == k
        assert len({c.frames_sha256 for c in cands}) == k  # distinct seeds -> different videos
    assert {c.weights_version for c in result.candidates} == {0}
    startup = group.startup_metrics()  # what align logs to MLflow when the replicas start
    assert startup["generator_load_seconds"] > 0 and "generator_compile_seconds" not in startup  # compile is off
    assert len({c.replica_id for c in result.candidates}) == 2

    # the bad prompt is quarantined with its reason, nothing else is lost
    assert [(q.item_id, q.reason) for q in result.quarantined] == [("ghost", "ImageLoadError")]
    assert QuarantineRecord.from_table(fs.read_table(result.quarantine_uri)) == result.quarantined
    assert Candidate.from_table(fs.read_table(result.candidates_uri)) == result.candidates

    # each file decodes with decord to the configured shape
    g = cfg.generator
    for c in result.candidates:
        frames = read_all_frames(c.video_uri)
        assert frames.shape == (g.num_frames, g.height, g.width, 3)
    clip = read_clip(result.candidates[0].video_uri, 5, cfg.video.sample_max_frames, 16)
    assert clip.shape == (5, 16, 16, 3)

    # same seed and weights version -> same frames (bit-exact), on whichever replica it lands;
    # the mp4 holds them up to H.264's loss (x264 output bytes can vary between processes)
    first, other = result.candidates[0], result.candidates[1]
    again, _ = group.generate([GenerationRequest(items[0], (first.seed,))] * 2, str(tmp_path / "again"))
    assert {c.frames_sha256 for c in again} == {first.frames_sha256}
    same = np.abs(read_all_frames(again[0].video_uri).astype(int) - read_all_frames(first.video_uri)).mean()
    different = np.abs(read_all_frames(other.video_uri).astype(int) - read_all_frames(first.video_uri)).mean()
    assert same < 3.0 and different > 5 * same


def test_replicas_are_persistent_actors_with_versions(replicas):
    cfg, group = replicas
    before = group.placements()
    assert group.weights_versions() == [0, 0]
    assert len({p["actor_id"] for p in before}) == 2 and all(p["device"] == "cpu" for p in before)
    assert [p["actor_id"] for p in group.placements()] == [p["actor_id"] for p in before]
    assert len({p["pid"] for p in before}) == 2
    assert all(os.getpid() != p["pid"] for p in before)
