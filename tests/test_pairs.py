"""The streaming pairs pipeline on the mini-cluster: tiny generator, classical reward backends, real Ray Data."""

from __future__ import annotations

import math

import pytest

from anisora_ray.config import PairsConfig
from anisora_ray.errors import ConfigError
from anisora_ray.pairs import read_pairs, read_skipped, select_pair
from anisora_ray.types import DIMENSIONS, QuarantineRecord, ScoredCandidate


def scored(seed: int, reward: float, reason: str | None = None) -> ScoredCandidate:
    return ScoredCandidate("p0", "prompt", "img.png", seed, seed, f"v{seed}.mp4", 3, 9, 32, 32, 8, "sha", "r", 0.1, 0.1,
                           None, {}, {"visual_motion": reward}, reward, reason)


def test_each_round_draws_its_own_prompts_the_same_on_every_resume():
    from anisora_ray.pairs.pipeline import round_order
    from anisora_ray.types import PromptItem

    items = [PromptItem(f"p{i:02d}", "a prompt", "a.png") for i in range(20)]
    firsts = {r: [i.prompt_id for i in round_order(items, 0, r)[:5]] for r in range(1, 5)}
    assert len({tuple(v) for v in firsts.values()}) == 4  # not the manifest's first five every round
    assert [i.prompt_id for i in round_order(list(reversed(items)), 0, 2)[:5]] == firsts[2]  # nor its order
    assert sorted(i.prompt_id for i in round_order(items, 0, 3)) == [i.prompt_id for i in items]  # all of them


def test_pair_rules():
    rules = PairsConfig()
    pair = select_pair("p0", [scored(1, 0.4), scored(2, 0.9), scored(3, 0.1), scored(4, float("nan"), "corrupt")], rules)
    assert (pair.winner_seed, pair.loser_seed) == (2, 3)
    assert pair.reward_gap == pytest.approx(0.8) and pair.weights_version == 3
    assert pair.winner_scores == {"visual_motion": 0.9}
    few = select_pair("p0", [scored(1, 0.4), scored(2, float("nan"), "VideoDecodeError: truncated")], rules)
    assert few.reason == "fewer than two valid candidates" and "truncated" in few.detail
    assert select_pair("p0", [scored(1, 0.5), scored(2, 0.5)], rules).reason == "tie"
    kept = select_pair("p0", [scored(1, 0.5), scored(2, 0.5)], PairsConfig(ties="keep"))
    assert (kept.winner_seed, kept.loser_seed, kept.reward_gap) == (1, 2, 0.0)
    assert select_pair("p0", [scored(1, 0.5), scored(2, 0.55)], PairsConfig(min_gap=0.1)).reason == "gap below min_gap"
    with pytest.raises(ValueError, match="ties='keep' keeps pairs whose rewards are equal, and min_gap=0.1"):
        PairsConfig(ties="keep", min_gap=0.1)  # min_gap would skip every tie: keep could never apply


@pytest.fixture
def pairs_cfg(make_config):
    def make(*extra: str):
        return make_config("generator.replicas=2", "generator.candidates_per_prompt=3", "pairs.flush_every=1",
                           "reward.batch_size=2", "reward.dimensions.visual_motion.batch_size=1",
                           "pairs.decode_batch_size=3", *extra)

    return make


def key(pair):
    return (pair.prompt_id, pair.winner_seed, pair.loser_seed, round(pair.winner_reward, 9), round(pair.loser_reward, 9))


def test_pairs_stream_one_per_prompt_and_resume_exactly_once(ray_cluster, pairs_cfg, demo_manifest, tmp_path):
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.pairs.stage import run_pairs

    # x264 reads uninitialised padding on frames under ~128 px (its output varies run to run for the
    # same frames), so this exactly-equal comparison runs at 128 x 128.
    size = ("generator.height=128", "generator.width=128")
    cfg = pairs_cfg(*size)
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    try:
        before = [(p["actor_id"], p["replica_id"]) for p in replicas.placements()]
        full = run_pairs(cfg, demo_manifest, str(tmp_path / "full"), replicas=replicas, progress=False)
        # An interrupted run (stopped after one prompt), then resumed, in another folder.
        first = run_pairs(pairs_cfg(*size, "pairs.max_prompts=1"), demo_manifest, str(tmp_path / "resumed"), replicas=replicas,
                          progress=False)
        capped = run_pairs(pairs_cfg(*size, "pairs.max_prompts=1"), demo_manifest, str(tmp_path / "resumed"),
                           replicas=replicas, progress=False)  # the round's cap is reached: a resume pairs no more
        assert (capped.already_done, capped.pairs) == (1, 0)
        # resumed with one forwarding task keeping 2 calls in flight (generator.calls_per_task): the same pairs
        rest = run_pairs(pairs_cfg(*size, "generator.calls_per_task=2"), demo_manifest, str(tmp_path / "resumed"),
                         replicas=replicas, progress=False)
        again = run_pairs(cfg, demo_manifest, str(tmp_path / "resumed"), replicas=replicas, progress=False)
        # Stopped from outside (the overlapped schedule's round failed beside it): at the first prompt written, which
        # is kept; a resume makes the rest
        import threading

        from anisora_ray.loop.rounds import PairsStopped, _stopper

        stop = threading.Event()
        stop.set()
        with pytest.raises(PairsStopped, match="pairs stopped after demo-000"):
            run_pairs(cfg, demo_manifest, str(tmp_path / "stopped"), replicas=replicas, progress=False,
                      on_prompt=_stopper(stop))
        assert len(read_pairs(str(tmp_path / "stopped"))) == 1
        # leases a cancelled or killed forwarding task never released: the next stage starts without them
        import ray

        ray.get([replicas.router.lease.remote((1,)) for _ in range(3)])
        finished = run_pairs(cfg, demo_manifest, str(tmp_path / "stopped"), replicas=replicas, progress=False)
        assert (finished.already_done, finished.pairs) == (1, 2)
        assert ray.get(replicas.router.loads.remote()) == [0, 0]
        # The same persistent actors, not reloaded, still at their weights version.
        assert [(p["actor_id"], p["replica_id"]) for p in replicas.placements()] == before
        assert replicas.weights_versions() == [0, 0]
    finally:
        replicas.shutdown()

    pairs = read_pairs(str(tmp_path / "full"))
    assert full.pairs == len(pairs) == 3 and full.candidates == 9 and full.quarantined_candidates == 0
    assert sorted(p.prompt_id for p in pairs) == ["demo-0000", "demo-0001", "demo-0002"]
    for p in pairs:
        assert p.winner_reward >= p.loser_reward
        assert p.reward_gap == pytest.approx(p.winner_reward - p.loser_reward)
        assert set(p.winner_scores) == set(p.loser_scores) == set(DIMENSIONS)
        assert p.winner_seed != p.loser_seed and p.weights_version == 0
        assert all(0 <= v <= 1 for v in p.winner_scores.values())

    assert (first.pairs, rest.already_done, rest.pairs, again.pairs, again.already_done) == (1, 1, 2, 0, 3)
    resumed = read_pairs(str(tmp_path / "resumed"))
    assert len({p.prompt_id for p in resumed}) == len(resumed) == 3  # no duplicates
    assert sorted(map(key, resumed)) == sorted(map(key, pairs))  # the pairs of the uninterrupted run


def test_a_corrupt_candidate_is_quarantined_and_its_prompt_still_pairs(ray_cluster, pairs_cfg, demo_manifest, tmp_path):
    from anisora_ray.generation.stage import run_generation
    from anisora_ray.pairs.pipeline import pair_candidates

    cfg = pairs_cfg("generator.replicas=1", "pairs.keep_scores=true")
    generated = run_generation(cfg, demo_manifest, str(tmp_path / "gen"), progress=False)
    bad = generated.candidates[1]  # demo-0000, its second seed
    with open(bad.video_uri, "r+b") as f:
        f.truncate(300)
    result = pair_candidates(cfg, generated.candidates, str(tmp_path / "pairs"), progress=False)
    assert (result.pairs, result.candidates, result.quarantined_candidates) == (3, 9, 1)
    pairs = {p.prompt_id: p for p in read_pairs(str(tmp_path / "pairs"))}
    assert bad.video_uri not in (pairs["demo-0000"].winner_video_uri, pairs["demo-0000"].loser_video_uri)
    from anisora_ray.io import fs

    scores = ScoredCandidate.from_table(fs.read_table(str(next((tmp_path / "pairs").glob("scores-*.parquet")))))
    everything = [s for f in sorted((tmp_path / "pairs").glob("scores-*.parquet"))
                  for s in ScoredCandidate.from_table(fs.read_table(str(f)))]
    assert len(everything) == 9 and scores
    quarantined = [s for s in everything if s.quarantine_reason]
    assert [q.video_uri for q in quarantined] == [bad.video_uri]
    assert quarantined[0].quarantine_reason.startswith("VideoDecodeError") and math.isnan(quarantined[0].reward)
    assert read_skipped(str(tmp_path / "pairs")) == []
    from anisora_ray.pairs.writer import read_quarantined

    [record] = read_quarantined(str(tmp_path / "pairs"))  # the set-aside candidate is on record, its prompt paired
    assert (record.stage, record.item_id, record.reason, record.uri) == ("pairs", "demo-0000", "VideoDecodeError",
                                                                          bad.video_uri)
    assert record.detail.startswith(f"seed {bad.seed}: VideoDecodeError")


def test_persistent_reward_actors_give_the_same_pairs(ray_cluster, pairs_cfg, demo_manifest, tmp_path):
    """pairs.reward_stage=actors: the same scores through persistent per-dimension actors, kept after the run."""
    import ray

    from anisora_ray.generation.stage import run_generation
    from anisora_ray.pairs.pipeline import pair_candidates
    from anisora_ray.reward.actors import RewardActors

    cfg = pairs_cfg("generator.replicas=1", "reward.dimensions.visual_motion.actor.memory_gib=0.125")  # reserved in both
    generated = run_generation(cfg, demo_manifest, str(tmp_path / "gen"), progress=False)
    in_pipeline = pair_candidates(cfg, generated.candidates, str(tmp_path / "pipeline"), progress=False)
    actors = RewardActors(cfg.reward)
    try:
        before = actors.placements()
        on_actors = pair_candidates(pairs_cfg("generator.replicas=1", "pairs.reward_stage=actors"), generated.candidates,
                                    str(tmp_path / "actors"), progress=False, reward_actors=actors)
        # The same live actors answer after the run (a dead or replaced actor would fail or differ).
        after = ray.get([a.placement.remote() for pool in actors.pools.values() for a in pool])
        assert [p["actor_id"] for p in after] == [p["actor_id"] for p in before]
    finally:
        actors.shutdown()
    assert in_pipeline.pairs == on_actors.pairs == 3
    assert sorted(map(key, read_pairs(str(tmp_path / "actors")))) == sorted(map(key, read_pairs(str(tmp_path / "pipeline"))))



def test_z_scored_rewards_do_not_depend_on_the_order_rows_stream_in(ray_cluster, make_config, tmp_path):
    """The same scored rows, streamed through Ray Data in two orders, give the same rewards and pairs
    (with a running z-score the first prompts were normalized against themselves)."""
    import dataclasses
    import random

    import ray

    from anisora_ray.pairs.pipeline import consume
    from anisora_ray.pairs.writer import PairWriter
    from anisora_ray.reward.statistics import RewardStatistics
    from anisora_ray.types import Candidate

    cfg = make_config("reward.dimensions.character.normalize.kind=zscore")
    names = [n for n, d in cfg.reward.dimensions.as_dict().items() if d.weight > 0]
    rng = random.Random(0)
    rows = []
    for p in range(6):
        for k in range(3):
            c = Candidate(f"p{p}", "a prompt", "img.png", 100 * p + k, k, f"p{p}-{k}.mp4", 0, 9, 32, 32, 8, "sha", "r",
                          0.1, 0.1, f"char{p % 2}")
            raw = {f"{n}_raw": rng.uniform(0.9, 1.0) if n == "visual_smoothness" else rng.uniform(0, 0.05 if
                   n == "visual_motion" else 1.0) for n in names}
            rows.append({**dataclasses.asdict(c), **raw, "error": "", "retries": 0})
    with pytest.raises(ConfigError, match="character.*zscore"):
        consume(cfg, ray.data.from_items(rows), PairWriter(str(tmp_path / "none")), 6, 0, progress=False)
    stats = RewardStatistics.from_raw([{n: r[f"{n}_raw"] for n in names} for r in rows], ["character"], "calibration")
    outcomes = []
    for i, order in enumerate([rows, sorted(rows, key=lambda r: -r["seed"]), rng.sample(rows, len(rows))]):
        out = str(tmp_path / f"order-{i}")
        result = consume(cfg, ray.data.from_items(order, override_num_blocks=5), PairWriter(out), 6, 0, progress=False,
                         statistics=stats)
        assert result.pairs == 6
        outcomes.append(sorted(key(p) for p in read_pairs(out)))
    assert outcomes[0] == outcomes[1] == outcomes[2]


def test_the_pairs_stage_resends_a_failed_call_elsewhere_and_the_router_leases_a_failing_replica_last(ray_cluster):
    """``generate_on_replicas`` (the pairs stage's generation task): a call that failed on a replica goes to another
    (``call_retries`` counts the tries wherever they ran), and ``runtime.LeastLoaded`` then leases that replica only
    when no other is left, until its cooldown has passed or a call on it succeeded. Real Ray actors stand in for the
    replicas: the routing is what is tested."""
    import pyarrow as pa
    import ray

    from anisora_ray.errors import InfrastructureError
    from anisora_ray.pairs.forward import generate_on_replicas
    from anisora_ray.runtime import LeastLoaded
    from anisora_ray.types import Candidate

    @ray.remote(num_cpus=0)
    class Replica:
        def __init__(self, broken: bool):
            self.broken, self.calls = broken, 0

        def start(self, requests, out_dir, exact):
            self.calls += 1
            if self.broken:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return [Candidate(r.item.prompt_id, r.item.prompt, r.item.image_uri, s, i, video_uri=f"{r.item.prompt_id}-{s}.mp4",
                              weights_version=0, num_frames=9, height=64, width=64, fps=8, frames_sha256="",
                              replica_id="r", generate_seconds=1.0, encode_seconds=0.1)
                    for r in requests for i, s in enumerate(r.seeds)]

        def finish(self, made):
            return made, []

        def count(self):
            return self.calls

    def batch(prompts: range) -> pa.Table:
        return pa.Table.from_pylist([{"prompt_id": f"p{p}", "prompt": "a prompt", "image_uri": "image.png",
                                      "character_id": None, "seed": s, "candidate_index": s}
                                     for p in prompts for s in range(2)])

    replicas = [Replica.remote(broken) for broken in (True, False, False)]
    router = LeastLoaded.remote(3)
    out = generate_on_replicas(batch(range(4)), replicas, router, "out", retries=1, prompts_per_call=1).to_pylist()
    assert [r["error"] for r in out] == [""] * 8 and {r["video_uri"] for r in out} == {f"p{p}-{s}.mp4" for p in range(4)
                                                                                       for s in range(2)}
    assert out[0]["retries"] == 2  # the two calls first leased to replica 0 (least loaded in turn), each sent again
    assert ray.get(router.loads.remote()) == [0, 0, 0]
    assert ray.get(replicas[0].count.remote()) == 2
    generate_on_replicas(batch(range(4, 10)), replicas, router, "out", retries=0, prompts_per_call=1)
    assert ray.get(replicas[0].count.remote()) == 2  # within its cooldown: not leased while the others are there

    fresh = LeastLoaded.remote(2, cooldown_s=0.0)  # cooldown over: the replica is tried again, and fails the stage
    with pytest.raises(InfrastructureError, match=r"generator call of prompts \['p0'\] \(replicas \[0, 1\]\) failed 2 "
                                                  r"time\(s\).*CUDA error"):
        generate_on_replicas(batch(range(1)), [replicas[0], Replica.remote(True)], fresh, "out", retries=1,
                             prompts_per_call=1)
    assert ray.get(fresh.loads.remote()) == [0, 0]


def test_scores_of_prompts_an_interrupted_flush_left_undone_are_not_written_twice(tmp_path):
    """A flush writes scores, quarantined candidates, skipped, then pairs: cut short before its pairs shard, its
    prompts are redone on resume, and the rows it did write for them are dropped when the next writer opens (kept
    for those done)."""
    import dataclasses
    import os
    import shutil

    from anisora_ray.io import fs
    from anisora_ray.pairs.writer import PairWriter, read_quarantined

    out = str(tmp_path / "pairs")
    rules = PairsConfig()
    a = [dataclasses.replace(scored(s, r), prompt_id="p") for s, r in ((1, 0.9), (2, 0.1))]
    b = [dataclasses.replace(scored(s, 0.5), prompt_id="b") for s in (3, 4)]
    aside = {q: [QuarantineRecord("pairs", q, "VideoDecodeError", f"{q}-9.mp4")] for q in "pb"}
    writer = PairWriter(out)
    writer.add(select_pair("p", a, rules), a, aside["p"])
    writer.add(select_pair("b", b, PairsConfig(ties="skip")), b, aside["b"])  # a tie: skipped (done once written)
    writer.flush()
    assert sorted(os.listdir(out)) == ["pairs-00000.parquet", "quarantine-00000.parquet", "scores-00000.parquet",
                                       "skipped-00000.parquet"]
    shutil.copytree(out, str(tmp_path / "early"))
    for name in ("pairs-00000.parquet", "skipped-00000.parquet"):  # died after the scores and quarantine shards
        os.remove(os.path.join(str(tmp_path / "early"), name))
    assert PairWriter(str(tmp_path / "early")).done == set() and os.listdir(tmp_path / "early") == []
    os.remove(os.path.join(out, "pairs-00000.parquet"))  # the driver died before the pairs shard was written

    again = PairWriter(out)
    assert again.done == {"b"}
    scores = fs.read_table(os.path.join(out, "scores-00000.parquet")).to_pylist()
    assert sorted((r["prompt_id"], r["seed"]) for r in scores) == [("b", 3), ("b", 4)]  # p's rows dropped
    again.add(select_pair("p", a, rules), a)  # p redone
    again.flush()
    rows = [r for name in sorted(os.listdir(out)) if name.startswith("scores-")
            for r in fs.read_table(os.path.join(out, name)).to_pylist()]
    assert sorted((r["prompt_id"], r["seed"]) for r in rows) == [("b", 3), ("b", 4), ("p", 1), ("p", 2)]
    assert [p.prompt_id for p in read_pairs(out)] == ["p"]
    assert [q.item_id for q in read_quarantined(out)] == ["b"]  # p's, written before p was done: dropped (redone without)
    # each kind as one table (what the round's MLflow run gets: one artifact per kind, not one per shard)
    from anisora_ray.pairs.writer import shard_tables

    tables = shard_tables(out)
    assert {k: t.num_rows for k, t in tables.items()} == {"pairs": 1, "skipped": 1, "scores": 4, "quarantine": 1}
    assert sorted(tables["scores"].column("prompt_id").to_pylist()) == ["b", "b", "p", "p"]
