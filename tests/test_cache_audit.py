"""The cache audit (eval/cache_audit.py): a replica renders each audited prompt with its step cache and with every
step computed; the exact rendering is what a replica without the cache renders, the drift is measured on raw frames,
a bad prompt is quarantined alone, and through Ray both renderings are scored into a table and MLflow metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os

import numpy as np

from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.generator import Generator
from anisora_ray.generation.speed import frame_drift
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.types import GenerationRequest


def _sha(videos: np.ndarray) -> list[str]:
    return [hashlib.sha256(v.tobytes()).hexdigest() for v in videos]


def test_a_replica_audits_its_cache_against_exact_frames_and_quarantines_a_bad_prompt(make_config, demo_manifest,
                                                                                      tmp_path, monkeypatch):
    cfg = make_config("generator.num_inference_steps=8", "generator.cache.kind=faster_cache")
    pretrained = resolve_pretrained(cfg.model, cfg.generator)
    plain = Generator(pretrained, cfg.model, make_config("generator.num_inference_steps=8").generator, cfg.video)
    cached = Generator(pretrained, cfg.model, cfg.generator, cfg.video)
    items = read_manifest(demo_manifest)
    missing = dataclasses.replace(items[1], image_uri=str(tmp_path / "missing.png"))
    requests = [GenerationRequest(items[0], (1, 2)), GenerationRequest(missing, (3,)), GenerationRequest(items[2], (4,))]
    with_cache, exact, drift, quarantined = cached.audit(requests, str(tmp_path / "audit"))

    assert [(q.stage, q.item_id) for q in quarantined] == [("generation", items[1].prompt_id)]  # the others go on
    ok = [requests[0], requests[2]]
    keys = [(r.item.prompt_id, s) for r in ok for s in r.seeds]
    assert [(c.prompt_id, c.seed) for c in with_cache] == [(c.prompt_id, c.seed) for c in exact] == keys
    want_exact = np.concatenate([plain.render([r]) for r in ok])  # what a replica without the cache renders
    want_cached = np.concatenate([cached.render([r]) for r in ok])
    assert [c.frames_sha256 for c in exact] == _sha(want_exact)
    assert [c.frames_sha256 for c in with_cache] == _sha(want_cached)
    assert drift == [{"prompt_id": p, "seed": s, **frame_drift(c, e)}
                     for (p, s), c, e in zip(keys, want_cached, want_exact)]
    assert all(d["drift_mean_levels"] > 0 and math.isfinite(d["psnr_db"]) for d in drift)  # FasterCache moved them
    for kind, group in (("cached", with_cache), ("exact", exact)):
        assert all(os.path.getsize(c.video_uri) > 0 and f"/audit/{kind}/videos/" in c.video_uri for c in group)

    # a request whose exact videos cannot be encoded (a bad value): quarantined with its twins and drift, the rest goes on
    write = cached._write

    def refuse_one(request, videos, seconds, out_dir, version):
        if request.item.prompt_id == items[2].prompt_id and out_dir.endswith("exact"):
            raise ValueError("yuv420p needs an even height and width")
        return write(request, videos, seconds, out_dir, version)

    monkeypatch.setattr(cached, "_write", refuse_one)
    with_cache, exact, drift, quarantined = cached.audit(ok, str(tmp_path / "again"))
    assert [(q.item_id, q.reason) for q in quarantined] == [(items[2].prompt_id, "ValueError")]
    first = [(items[0].prompt_id, s) for s in requests[0].seeds]
    assert [(c.prompt_id, c.seed) for c in with_cache] == [(c.prompt_id, c.seed) for c in exact] == first
    assert [(d["prompt_id"], d["seed"]) for d in drift] == first


def test_pairs_kept_or_lost_their_gapo_signal_and_the_metrics_of_an_audit():
    from anisora_ray.eval.cache_audit import CacheAudit, PairOutcome, pair_outcomes

    def row(prompt, seed, cached, exact, mse=4.0):
        return {"prompt_id": prompt, "seed": seed, "drift_mean_levels": 1.0, "drift_max_levels": 9.0,
                "psnr_db": 10 * math.log10(255.0**2 / mse) if mse else math.inf, "mse": mse,
                "reward_cached": cached, "reward_exact": exact, "reward_change": cached - exact}

    rows = [row("a", 1, 0.9, 0.8), row("a", 2, 0.1, 0.2), row("a", 3, 0.5, 0.5),  # same best (1) and worst (2)
            row("b", 1, 0.6, 0.4), row("b", 2, 0.5, 0.7),  # the cache inverts b's pair
            row("n", 1, 0.49, 0.50), row("n", 2, 0.50, 0.49), row("n", 3, 0.1, 0.1),  # a near-tie swapped: 2 wins
            row("c", 1, 0.5, math.nan), row("c", 2, 0.4, 0.3)]  # one seed scored both ways: no pair to compare
    pairs = pair_outcomes(rows, alpha=2.0)
    assert {p: o.kept for p, o in pairs.items()} == {"a": True, "b": False, "n": False}
    assert pairs["a"] == PairOutcome(True, 2**0.8 - 2**0.2, 2**0.8 - 2**0.2)
    assert pairs["b"] == PairOutcome(False, 2**0.7 - 2**0.4, 2**0.4 - 2**0.7)  # all its signal, the wrong way
    assert pairs["n"] == PairOutcome(False, 2**0.5 - 2**0.1, 2**0.49 - 2**0.1)
    assert pairs["n"].signal_cached / pairs["n"].signal_exact > 0.97  # the swap costs it little
    assert pair_outcomes([row("t", 5, 0.5, 0.5), row("t", 3, 0.5, 0.5)], 2.0) == {"t": PairOutcome(True, 0.0, 0.0)}
    m = CacheAudit(rows, pairs, 1, "x").metrics()
    assert m["cache_audit_videos"] == 10 and m["cache_audit_quarantined"] == 1 and m["cache_audit_same_pair"] == 1 / 3
    assert math.isclose(m["cache_audit_signal_kept"], sum(o.signal_cached for o in pairs.values())
                        / sum(o.signal_exact for o in pairs.values()))
    finite = [r["reward_change"] for r in rows if math.isfinite(r["reward_change"])]
    assert math.isclose(m["cache_audit_reward_change"], sum(finite) / 9)
    assert math.isclose(m["cache_audit_reward_abs_change"], sum(map(abs, finite)) / 9)
    assert math.isclose(m["cache_audit_psnr_db"], 10 * math.log10(255.0**2 / 4.0))
    equal = CacheAudit([row("a", 1, 0.5, 0.5, mse=0.0)], {}, 0, "x").metrics()
    assert "cache_audit_psnr_db" not in equal and "cache_audit_same_pair" not in equal  # no infinity to MLflow
    ties = CacheAudit(rows, {"t": PairOutcome(True, 0.0, 0.0)}, 0, "x").metrics()
    assert ties["cache_audit_same_pair"] == 1 and "cache_audit_signal_kept" not in ties  # all ties: no signal to keep

    from anisora_ray.loop.html_report import cache_audit_table

    page = cache_audit_table([{"round": 0, **m}, {"round": 1}, {"round": 2, **equal}])  # round 1 not audited
    assert page.count("<tr>") == 3 and "<td>33%</td>" in page and f"<td>{m['cache_audit_signal_kept']:.0%}</td>" in page
    assert f"<td>{sum(finite) / 9:+.4f}</td>" in page
    assert cache_audit_table([{"round": 0}, {"round": 1}]) == ""


def test_audit_through_replicas_and_reward_actors_scores_both_renderings(ray_cluster, make_config, demo_manifest,
                                                                         tmp_path):
    import pyarrow as pa

    from anisora_ray.eval.cache_audit import AUDIT_FILE, audit_cache, audit_due
    from anisora_ray.eval.heldout import EVAL_ROUND
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.generation.seeding import build_requests, candidate_seeds
    from anisora_ray.io import fs
    from anisora_ray.pairs.forward import generate_on_replicas
    from anisora_ray.reward.actors import RewardActors

    cfg = make_config("generator.replicas=1", "generator.num_inference_steps=8", "generator.cache.kind=faster_cache",
                      "generator.cache.audit_prompts=2", "generator.cache.audit_every=2", "generator.candidates_per_prompt=3",
                      "eval.candidates_per_prompt=2")
    assert [audit_due(cfg, i) for i in range(4)] == [True, False, True, False]
    assert not audit_due(make_config("generator.cache.audit_prompts=2"), 0)  # no cache, nothing to audit
    items = read_manifest(demo_manifest)
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    actors = RewardActors(cfg.reward)
    try:
        audit = audit_cache(cfg, items, replicas, actors, str(tmp_path / "audit"), progress=False)
        # eval.exact's path: the replicas' generate with every step computed renders the audit's exact twins
        requests = build_requests(items[:2], cfg, EVAL_ROUND)
        exact, _ = replicas.generate(requests, str(tmp_path / "exact"), exact=True)
        cached, _ = replicas.generate(requests, str(tmp_path / "cached"))
        # the pairs stage's rollouts (loop/cache_policy.py: on_moved_pairs=exact renders them with every step computed)
        rows = pa.Table.from_pylist([{"prompt_id": r.item.prompt_id, "prompt": r.item.prompt, "image_uri": r.item.image_uri,
                                      "character_id": r.item.character_id, "seed": s, "candidate_index": i}
                                     for r in requests for i, s in enumerate(r.seeds)])
        staged = {flag: generate_on_replicas(rows, replicas.actors, replicas.router, str(tmp_path / f"stage-{flag}"),
                                             prompts_per_call=1, exact=flag).to_pylist() for flag in (False, True)}
    finally:
        actors.shutdown()
        replicas.shutdown()

    audited = [i.prompt_id for i in items[:2]]
    seeds = {p: candidate_seeds(cfg.run.seed, p, 3, EVAL_ROUND) for p in audited}  # a rollout's K = 3 ...
    assert all(seeds[p][:2] == candidate_seeds(cfg.run.seed, p, 2, EVAL_ROUND) for p in audited)  # ... the eval's first
    assert [(r["prompt_id"], r["seed"]) for r in audit.rows] == [(p, s) for p in audited for s in sorted(seeds[p])]
    assert all(math.isfinite(r["reward_cached"]) and math.isfinite(r["reward_exact"]) for r in audit.rows)
    assert any(r["reward_change"] != 0 for r in audit.rows)  # the cache moved the frames, the rewards follow
    assert set(audit.pairs) == set(audited)
    table = fs.read_table(str(tmp_path / "audit" / AUDIT_FILE)).to_pylist()
    o = audit.pairs
    assert [(r["prompt_id"], r["seed"], r["same_pair"], r["pair_signal_exact"], r["pair_signal_cached"]) for r in table] == [
        (p, r["seed"], o[p].kept, o[p].signal_exact, o[p].signal_cached) for r in audit.rows if (p := r["prompt_id"])]
    assert all(o[p].signal_exact >= max(o[p].signal_cached, 0) for p in audited)  # the exact pair's weight is the most
    rows = {(r["prompt_id"], r["seed"]): r for r in audit.rows}
    assert {(c.prompt_id, c.seed): c.frames_sha256 for c in exact} == {k: r["frames_sha256_exact"] for k, r in rows.items()}
    assert {(c.prompt_id, c.seed): c.frames_sha256 for c in cached} == {k: r["frames_sha256_cached"] for k, r in rows.items()}
    for flag, kind in ((True, "exact"), (False, "cached")):
        assert {(c["prompt_id"], c["seed"]): c["frames_sha256"] for c in staged[flag]} == {
            k: r[f"frames_sha256_{kind}"] for k, r in rows.items()}
    assert all(os.path.isfile(r["video_cached"]) and os.path.isfile(r["video_exact"]) for r in audit.rows)
    m = audit.metrics()
    assert m["cache_audit_videos"] == 6 and m["cache_audit_quarantined"] == 0
    assert m["cache_audit_drift_mean_levels"] > 0 and math.isfinite(m["cache_audit_psnr_db"])
    assert m["cache_audit_same_pair"] == sum(o[p].kept for p in audited) / len(audited)  # each audited prompt's pair


def test_both_wan22_a14b_experts_compute_every_step_in_the_audits_reference(make_config, demo_manifest, tmp_path):
    """Wan2.2-A14B: TaylorSeer hooks both experts (the high-noise one early, the low-noise one late); the audit's
    exact rendering forces both, so it is the uncached video."""
    cfg = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b", "generator.num_inference_steps=8",
                      "generator.cache.kind=taylorseer", "generator.cache.warmup_steps=1", "generator.cache.compute_every=3")
    pretrained = resolve_pretrained(cfg.model, cfg.generator)
    gen = Generator(pretrained, cfg.model, cfg.generator, cfg.video)
    plain = Generator(pretrained, cfg.model, make_config(
        "model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b", "generator.num_inference_steps=8").generator,
        cfg.video)
    request = [GenerationRequest(read_manifest(demo_manifest)[0], (5, 6))]
    reference = plain.render(request)
    cached, exact, drift, _ = gen.audit(request, str(tmp_path / "audit"))
    assert [c.frames_sha256 for c in exact] == _sha(reference)
    assert all(d["drift_mean_levels"] > 0 for d in drift)  # predicted steps moved the cached frames
    assert [c.frames_sha256 for c in cached] == _sha(gen.render(request))
