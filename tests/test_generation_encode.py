"""A replica encodes a call's videos in a thread of its own (``Generator.start`` / ``finish``): the GPU renders the
next call meanwhile; what is written, and with which weights version, is what ``generate`` wrote before."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from anisora_ray.config import ActorResources, GeneratorConfig, ModelConfig, TinyModelConfig, VideoConfig
from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.generator import Generator
from anisora_ray.io.video import read_clip
from anisora_ray.models.tiny import save_tiny_i2v_pipeline
from anisora_ray.types import GenerationRequest
from anisora_ray.weights.update import base_targets
from tests.conftest import in_memory_update

GEN = GeneratorConfig(height=32, width=32, num_frames=9, num_inference_steps=3)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    return save_tiny_i2v_pipeline(TinyModelConfig(), 32, 32, 9, str(tmp_path_factory.mktemp("tiny") / "tiny"))


def test_pipelined_calls_write_what_generate_writes_with_the_version_they_rendered(tiny_path, tmp_path, demo_manifest):
    items = read_manifest(demo_manifest)
    requests = [[GenerationRequest(items[0], (1, 2))], [GenerationRequest(items[1], (3,))]]
    reference = Generator(tiny_path, ModelConfig(), GEN, VideoConfig(), weights_version=1)
    expected = [reference.generate(r, str(tmp_path / "sync"))[0] for r in requests]

    gen = Generator(tiny_path, ModelConfig(), GEN, VideoConfig(), weights_version=1)
    first = gen.start(requests[0], str(tmp_path / "pipelined"))
    # an update lands before the first call's videos are collected: they keep the version they were rendered with
    scaled = sorted((name, t * 1.5) for name, t in base_targets(gen.receiving_module()).items())
    gen.load_weights(*in_memory_update(2, scaled, "full"))
    second = gen.start(requests[1], str(tmp_path / "pipelined"))
    (got_first, q1), (got_second, q2) = gen.finish(first), gen.finish(second)

    assert q1 == q2 == [] and not gen._encodes  # every ticket redeemed
    assert [c.weights_version for c in got_first] == [1, 1] and [c.weights_version for c in got_second] == [2]
    assert [c.frames_sha256 for c in got_first] == [c.frames_sha256 for c in expected[0]]  # same frames as generate's
    assert got_second[0].frames_sha256 != expected[1][0].frames_sha256  # rendered with the new weights
    for c in got_first + got_second:
        assert os.path.getsize(c.video_uri) > 0 and c.encode_seconds > 0
        assert read_clip(c.video_uri, 9, 9).shape == (9, 32, 32, 3)
    with pytest.raises(KeyError):
        gen.finish(first)  # a ticket is redeemed once


def test_a_request_whose_videos_cannot_be_encoded_is_quarantined_and_the_others_are_written(tiny_path, tmp_path,
                                                                                            demo_manifest):
    items = read_manifest(demo_manifest)
    gen = Generator(tiny_path, ModelConfig(), GEN, VideoConfig(), weights_version=4)
    good, bad = GenerationRequest(items[0], (1,)), GenerationRequest(items[1], (2,))
    video = gen.render([good])
    odd = np.zeros((1, 9, 31, 32, 3), np.uint8)  # yuv420p refuses an odd height: a bad value, named
    candidates, quarantined = gen._write_isolating([([good], video, 1.0), ([bad], odd, 1.0)], [], str(tmp_path), 4)
    assert [c.prompt_id for c in candidates] == [items[0].prompt_id] and candidates[0].weights_version == 4
    assert candidates[0].frames_sha256 == hashlib.sha256(video[0].tobytes()).hexdigest()
    assert [(q.item_id, q.reason) for q in quarantined] == [(items[1].prompt_id, "ValueError")]
    assert "even height and width" in quarantined[0].detail


@pytest.mark.parametrize(("cpus", "threads"), [(2, 1), (3, 2)])
def test_a_replica_encodes_with_its_cpus_but_the_rendering_one(tiny_path, tmp_path, demo_manifest, cpus, threads):
    """x264 writes the threads it ran with into the stream; left to itself it takes them from the node's cores."""
    gen = Generator(tiny_path, ModelConfig(), GEN.model_copy(update={"actor": ActorResources(num_cpus=cpus)}), VideoConfig())
    assert gen.encode_threads == threads
    big = np.random.default_rng(0).integers(0, 256, (1, 9, 128, 128, 3), dtype=np.uint8)  # x264 threads from 128 px
    request = GenerationRequest(read_manifest(demo_manifest)[0], (1,))
    (written,) = gen._write(request, big, 1.0, str(tmp_path), 0)
    with open(written.video_uri, "rb") as f:
        data = f.read()
    assert f" threads={threads} ".encode() in data


def test_a_replica_collects_a_calls_videos_while_it_renders_the_next(ray_cluster, make_config, demo_manifest):
    """``finish`` runs in its own concurrency group: it returns while the replica's one rendering thread is busy."""
    import ray

    from anisora_ray.generation.replicas import GeneratorReplicas, generate_call
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = make_config("generator.replicas=1")
    items = read_manifest(demo_manifest)
    group = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        actor, out = group.actors[0], str(os.path.dirname(demo_manifest))
        small = actor.start.remote([GenerationRequest(items[0], (1,))], out)
        ray.get(small)  # rendered; its encoding may still run
        busy = actor.start.remote([GenerationRequest(items[1], tuple(range(100, 124)))], out)  # a long render
        collected = actor.finish.remote(small)
        done, _ = ray.wait([collected, busy], num_returns=1, timeout=120)
        assert done == [collected]  # not queued behind the long render
        candidates, quarantined = ray.get(collected)
        assert len(candidates) == 1 and quarantined == []
        assert len(ray.get(actor.finish.remote(busy))[0]) == 24
        made, failed = ray.get(generate_call(actor, [GenerationRequest(items[2], (5, 6))], out))
        assert [c.seed for c in made] == [5, 6] and failed == []
    finally:
        group.shutdown()


def test_a_compiled_replica_compiles_at_start_up_only_though_its_calls_run_in_another_thread(ray_cluster, make_config,
                                                                                            demo_manifest):
    """A replica with a concurrency group runs its constructor and its calls in different threads; it compiles and
    warms up (``generator.compile``) at start-up in the calls' thread, and its calls compile nothing more."""
    import ray

    from anisora_ray.generation.replicas import GeneratorReplicas, generate_call
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = make_config("generator.replicas=1", "generator.compile=true")
    items = read_manifest(demo_manifest)
    group = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        actor = group.actors[0]
        graphs = ray.get(actor.compiled_graphs.remote())
        assert graphs > 0 and group.startup_metrics()["generator_compile_seconds"] > 0
        k = cfg.generator.candidates_per_prompt  # the batch it warmed up at
        for first in (1, 1 + k):
            seeds = tuple(range(first, first + k))
            made, failed = ray.get(generate_call(actor, [GenerationRequest(items[0], seeds)], os.path.dirname(demo_manifest)))
            assert len(made) == k and failed == []
        assert ray.get(actor.compiled_graphs.remote()) == graphs
    finally:
        group.shutdown()
