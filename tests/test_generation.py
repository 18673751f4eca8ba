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


def test_an_interrupted_generation_renders_only_what_its_journal_lacks(replicas, demo_manifest, tmp_path, caplog):
    """The held-out evaluation's generation (``resume``): each finished call is journalled, so a driver lost mid-way
    renders again only the requests without every seed's video (hours of a real round), and only for the same
    weights and settings; without ``resume`` the journal starts empty."""
    from anisora_ray.generation.journal import GenerationJournal, recipe
    from anisora_ray.generation.seeding import build_requests

    cfg, group = replicas
    items = [*read_manifest(demo_manifest), PromptItem("ghost", "a missing image", str(tmp_path / "nope.png"))]
    out = tmp_path / "eval"
    first = generate_candidates(cfg, items, str(out), group, progress=False, resume=True)
    journal = out / "journal"
    assert len(list(journal.glob("*.json"))) == 2  # 4 requests, 2 per call
    stamps = {c.video_uri: os.stat(c.video_uri).st_mtime_ns for c in first.candidates}
    lost = first.candidates[0]
    os.remove(lost.video_uri)  # its request (every seed of its prompt) is rendered again
    (journal / "cut-short.json").write_text('{"recipe": ')  # a journal file the interruption cut short
    again = generate_candidates(cfg, items, str(out), group, progress=False, resume=True)
    assert "cut-short.json unreadable" in caplog.text
    redone = {c.video_uri for c in again.candidates if c.prompt_id == lost.prompt_id}
    assert [q.item_id for q in again.quarantined] == ["ghost"]  # a prompt set aside counts as done
    assert [c.frames_sha256 for c in again.candidates] == [c.frames_sha256 for c in first.candidates]
    for before, after in zip(first.candidates, again.candidates, strict=True):
        if before.video_uri in redone:
            assert os.path.exists(after.video_uri) and after.generate_seconds != before.generate_seconds
        else:  # the journal's record, the video untouched
            assert after == before and os.stat(after.video_uri).st_mtime_ns == stamps[after.video_uri]
    assert Candidate.from_table(fs.read_table(again.candidates_uri)) == again.candidates

    # other weights or settings: nothing of the journal counts
    requests = build_requests(items, cfg)
    states = group.weights_states()
    assert len(GenerationJournal(str(out), recipe(cfg, states, False)).split(requests)[0]) == 0
    # a rebuilt manifest keeps its ids: a prompt whose text or image changed is rendered again
    import dataclasses

    changed = [dataclasses.replace(items[0], prompt="another prompt"), *items[1:-1],
               dataclasses.replace(items[-1], image_uri=str(tmp_path / "fixed.png"))]
    todo = GenerationJournal(str(out), recipe(cfg, states, False)).split(build_requests(changed, cfg))[0]
    assert [r.item.prompt_id for r in todo] == [items[0].prompt_id, "ghost"]
    more_steps = cfg.model_copy(update={"generator": cfg.generator.model_copy(
        update={"num_inference_steps": cfg.generator.num_inference_steps + 1})})
    for other, other_states, exact in ((cfg, [{**s, "version": 1} for s in states], False), (cfg, states, True),
                                       (more_steps, states, False)):
        assert GenerationJournal(str(out), recipe(other, other_states, exact)).split(requests)[0] == requests
    assert not list(journal.glob("*.json"))  # another recipe's entries go: it renders the same paths over their videos
    generate_candidates(cfg, items[:1], str(out), group, progress=False)  # not resumed: the journal starts over
    assert len(list(journal.glob("*.json"))) == 1


def test_replicas_are_persistent_actors_with_versions(replicas):
    cfg, group = replicas
    before = group.placements()
    assert group.weights_versions() == [0, 0]
    assert len({p["actor_id"] for p in before}) == 2 and all(p["device"] == "cpu" for p in before)
    assert [p["actor_id"] for p in group.placements()] == [p["actor_id"] for p in before]
    assert len({p["pid"] for p in before}) == 2
    assert all(os.getpid() != p["pid"] for p in before)


def test_a_call_that_failed_on_a_replica_is_sent_to_another_and_a_broken_replica_fails_nothing(ray_cluster, make_config):
    """``GeneratorReplicas._spread``: a replica that fails every call (a GPU raising CUDA errors, its process alive) gets
    each chunk at most once, the chunk goes to a replica it has not failed on, healthy replicas are preferred; the
    stage fails (naming the replicas) only when a chunk failed more than ``generator.call_retries`` times. Real Ray
    actors stand in for the replicas: the routing is what is tested."""
    import ray

    from anisora_ray.errors import InfrastructureError

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self, broken: bool):
            self.broken, self.calls = broken, 0

        def run(self, chunk):
            self.calls += 1
            if self.broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return ([r.item.prompt_id for r in chunk],)

        def count(self):
            return self.calls

    cfg = make_config("generator.max_calls_in_flight=1", "generator.call_retries=1")
    requests = [GenerationRequest(PromptItem(f"p{i}", "a prompt", "image.png"), (i,)) for i in range(8)]
    spread = object.__new__(GeneratorReplicas)  # only the routing: no pipelines
    spread.cfg = cfg
    spread.actors = [Replica.remote(broken) for broken in (True, False, False)]
    (done,) = spread._spread(lambda actor, chunk: actor.run.remote(chunk), 1, requests, None)
    assert sorted(done) == [f"p{i}" for i in range(8)]  # with call_retries=1: no chunk failed twice
    calls = ray.get([a.count.remote() for a in spread.actors])
    assert sum(calls[1:]) == 8 and 1 <= calls[0] < 8  # the broken one got at most its first calls and overflow

    spread.actors = [Replica.remote(True), Replica.remote(True)]
    with pytest.raises(InfrastructureError, match=r"generator replica\(s\) \[0, 1\] failed 2 time\(s\) on prompts "
                                                  r"\['p\d'\]: RayTaskError.*CUDA error"):
        spread._spread(lambda actor, chunk: actor.run.remote(chunk), 1, requests, None)


def test_each_round_and_the_held_out_set_draw_their_own_seeds_the_same_every_time():
    """On-policy rounds render each prompt anew (a round that reused the last one's seeds would pair the same noise),
    held-out candidates never share a training round's seeds, and every call gives the same seeds."""
    from anisora_ray.eval.heldout import EVAL_ROUND
    from anisora_ray.generation.seeding import candidate_seeds

    by_round = {r: candidate_seeds(7, "p1", 8, r) for r in (0, 1, 2, EVAL_ROUND)}
    assert all(len(set(s)) == 8 for s in by_round.values())
    for a in by_round:
        for b in by_round:
            assert a == b or set(by_round[a]).isdisjoint(by_round[b]), (a, b)
    assert candidate_seeds(7, "p1", 8, 2) == by_round[2] and candidate_seeds(7, "p1", 3, 2) == by_round[2][:3]
    assert set(candidate_seeds(8, "p1", 8, 2)).isdisjoint(by_round[2])  # the run seed
    assert set(candidate_seeds(7, "p2", 8, 2)).isdisjoint(by_round[2])  # the prompt
