"""What align does when the cache audit shows the step cache moving the pairs (loop/cache_policy.py): the share of
audited prompts that keep their pair, and the share of GAPO signal their pairs keep, are pooled over the job's audits,
a verdict is recorded once below ``generator.cache.min_same_pair`` or ``min_signal_kept``, and ``on_moved_pairs``
warns, renders later rollouts exactly, or stops the job.
(Exact rollouts through the pairs stage: tests/test_cache_audit.py; inside align: tests/test_overlap.py.)"""

from __future__ import annotations

import pytest

from anisora_ray.config import load_config
from anisora_ray.errors import CacheDriftError, ConfigError
from anisora_ray.eval.cache_audit import PairOutcome
from anisora_ray.loop import cache_policy
from anisora_ray.loop.state import AlignState

AUDITED = ["generator.cache.kind=faster_cache", "generator.cache.audit_prompts=4"]


def config(*overrides: str):
    return load_config(None, [*AUDITED, *overrides])


def kept(*flags: bool, signal: float = 1.0) -> dict[str, PairOutcome]:
    """An audit's prompts: a kept pair keeps its signal, a moved one keeps ``signal`` of it."""
    return {chr(97 + i): PairOutcome(k, 1.0, 1.0 if k else signal) for i, k in enumerate(flags)}


def test_the_pooled_share_decides_once_and_a_redone_round_replaces_its_own_count(tmp_path):
    cfg = config("generator.cache.min_same_pair=0.75", "generator.cache.on_moved_pairs=exact")
    state = AlignState()
    assert cache_policy.record_audit(cfg, state, 0, {}) == {}  # nothing audited yet (every video quarantined)
    kept_3_of_4 = kept(True, True, True, False, signal=-1.0)
    assert cache_policy.record_audit(cfg, state, 0, kept_3_of_4) == {"cache_audit_same_pair_pooled": 0.75,
                                                                      "cache_audit_signal_kept_pooled": 0.5}
    assert not state.cache_verdict and not cache_policy.rollouts_exact(cfg, state)  # 0.75 is not below 0.75
    half = kept(True, False, True, False, signal=0.5)
    assert cache_policy.record_audit(cfg, state, 2, half)["cache_audit_same_pair_pooled"] == 5 / 8
    assert state.cache_verdict == {"round": 2, "measure": "same_pair", "kept": 5, "audited": 8, "same_pair_pooled": 5 / 8,
                                   "signal_kept_pooled": 5 / 8, "min_same_pair": 0.75, "min_signal_kept": 0.0,
                                   "action": "exact"}
    assert cache_policy.rollouts_exact(cfg, state)
    cache_policy.record_audit(cfg, state, 2, half)  # round 2's evaluation redone after a driver loss: counted once
    assert state.cache_audits == {"0": [3, 4, 2.0, 4.0], "2": [2, 4, 3.0, 4.0]}
    cache_policy.record_audit(cfg, state, 4, kept(False, False))
    assert state.cache_verdict["round"] == 2  # the first verdict stands

    state.save(str(tmp_path / "state.json"))  # a resumed job keeps it
    resumed = AlignState.load(str(tmp_path / "state.json"))
    assert resumed.cache_verdict == state.cache_verdict and resumed.cache_audits == state.cache_audits


def test_swapped_near_ties_keep_the_signal_and_an_inverted_pair_loses_it():
    """``min_signal_kept``: the same share of moved pairs decides differently by what the moves cost GAPO."""
    cfg = config("generator.cache.min_signal_kept=0.8", "generator.cache.on_moved_pairs=stop")
    near_ties = AlignState()
    assert cache_policy.record_audit(cfg, near_ties, 0, kept(True, False, True, False, signal=0.9)) == {
        "cache_audit_same_pair_pooled": 0.5, "cache_audit_signal_kept_pooled": 0.95}
    assert not near_ties.cache_verdict  # half the pairs moved, 95% of the signal kept
    cache_policy.check_go_on(cfg, near_ties)
    inverted = AlignState()
    cache_policy.record_audit(cfg, inverted, 0, kept(True, True, True, False, signal=-1.0))  # 3 of 4 kept, (3-1)/4
    assert inverted.cache_verdict["measure"] == "signal_kept" and inverted.cache_verdict["signal_kept_pooled"] == 0.5
    with pytest.raises(CacheDriftError, match=r"1 of 4 audited prompts changed their pair; the cache's pairs keep 0.50 "
                                              r"of the exact pairs' GAPO signal < generator.cache.min_signal_kept 0.80"):
        cache_policy.check_go_on(cfg, inverted)
    ties = AlignState()  # every audited pair a tie: no signal to pool, no verdict on it
    assert cache_policy.record_audit(cfg, ties, 0, {"t": PairOutcome(True, 0.0, 0.0)}) == {
        "cache_audit_same_pair_pooled": 1.0}
    assert not ties.cache_verdict
    old = AlignState(cache_audits={"0": [1, 2]})  # a job begun before the signal was counted: its share pools on
    assert cache_policy.record_audit(cfg, old, 2, kept(True, True)) == {"cache_audit_same_pair_pooled": 0.75,
                                                                        "cache_audit_signal_kept_pooled": 1.0}


def test_the_action_is_read_from_the_config_a_job_runs_with():
    state = AlignState(cache_verdict={"round": 0, "same_pair_pooled": 0.25, "kept": 1, "audited": 4,
                                      "min_same_pair": 0.5, "action": "stop"})
    stop = config("generator.cache.min_same_pair=0.5", "generator.cache.on_moved_pairs=stop")
    with pytest.raises(CacheDriftError, match=r"moved the pairs by round 0 \(3 of 4 audited prompts changed their "
                                              r"pair; same pair 0.25 < .*generator.cache.kind=none.*--resume"):
        cache_policy.check_go_on(stop, state)
    assert not cache_policy.rollouts_exact(stop, state)
    cache_policy.check_go_on(config("generator.cache.min_same_pair=0.5", "generator.cache.on_moved_pairs=exact"), state)
    cache_policy.check_go_on(load_config(None, ["generator.cache.kind=none"]), state)  # the cache switched off: go on
    assert not cache_policy.rollouts_exact(load_config(None, ["generator.cache.kind=none"]), state)
    warn = config("generator.cache.min_same_pair=0.5")
    cache_policy.check_go_on(warn, state)
    assert not cache_policy.rollouts_exact(warn, state)
    cache_policy.check_go_on(stop, AlignState())  # no verdict, nothing to stop for


def test_a_warning_tags_the_jobs_mlflow_run(tmp_path, caplog):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        run_id = mlflow.MlflowClient().create_run(mlflow.MlflowClient().create_experiment(
            "cache", artifact_location=(tmp_path / "artifacts").as_uri())).info.run_id
        cfg = config("generator.cache.min_same_pair=1.0")
        state = AlignState()
        with caplog.at_level("WARNING", logger="anisora_ray.loop.cache_policy"):
            cache_policy.record_audit(cfg, state, 0, kept(True, False, signal=0.5), parent_run_id=run_id)
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
    finally:
        mlflow.set_tracking_uri(None)
    assert tags[cache_policy.TAG] == "moved pairs at round 0 (1/2 kept, 75% of the GAPO signal): warn"
    assert "1 of 2 audited prompts changed their pair" in caplog.text and "warning only" in caplog.text
    assert not cache_policy.rollouts_exact(cfg, state)


@pytest.mark.parametrize("overrides, culprit", [
    (["generator.cache.kind=faster_cache", "generator.cache.min_same_pair=0.5"], "audit_prompts=0"),
    (["generator.cache.kind=taylorseer", "generator.cache.min_signal_kept=0.5"], "min_signal_kept=0.5 .*audit_prompts=0"),
    ([*AUDITED, "generator.cache.min_same_pair=1.5"], "min_same_pair"),
    ([*AUDITED, "generator.cache.min_signal_kept=-0.1"], "min_signal_kept"),
    ([*AUDITED, "generator.cache.on_moved_pairs=retry"], "on_moved_pairs"),
    ([*AUDITED, "generator.cache.on_moved_pairs=exact"], "on_moved_pairs='exact' acts .* both 0"),  # would never act
])
def test_a_policy_without_audits_or_out_of_range_is_refused_by_name(overrides, culprit):
    with pytest.raises(ConfigError, match=culprit):
        load_config(None, overrides)
    # a config that switches the cache off keeps the policy it inherits: nothing is audited, nothing acted on
    load_config(None, ["generator.cache.kind=none", "generator.cache.min_same_pair=0.5"])


def test_after_an_exact_verdict_the_rounds_pairs_are_rendered_with_every_step(ray_cluster, make_config, demo_manifest,
                                                                             tmp_path):
    """align's pairs phase with a standing verdict and ``on_moved_pairs: exact``: the pairs' videos are the exact
    renderings of their seeds (byte for byte), not the cached ones, and the round logs ``rollouts_exact``."""
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.generation.seeding import build_requests
    from anisora_ray.loop.align import Workers
    from anisora_ray.loop.rounds import RoundContext, pairs_phase
    from anisora_ray.pairs.writer import read_pairs
    from anisora_ray.tracking import mlflow_run

    cfg = make_config("generator.replicas=1", "generator.num_inference_steps=8", "generator.cache.kind=faster_cache",
                      "generator.cache.audit_prompts=1", "generator.cache.min_same_pair=1.0",
                      "generator.cache.on_moved_pairs=exact", "generator.candidates_per_prompt=2")
    state = AlignState(cache_verdict={"round": 0, "same_pair_pooled": 0.0, "kept": 0, "audited": 1, "min_same_pair": 1.0,
                                      "action": "exact"})
    workers = Workers(cfg)
    try:
        with mlflow_run(cfg, "job") as parent:
            ctx = RoundContext(cfg, state, workers, [], demo_manifest, str(tmp_path / "align"), str(tmp_path), False,
                               parent.info.run_id, str(tmp_path / "align" / "state.json"), None)
            rs = state.round(1)
            pairs_phase(ctx, rs)
        requests = build_requests(read_manifest(demo_manifest), cfg, 1)  # round 1's seeds, a call per prompt as there
        renders = {kind: workers.replicas.generate(requests, str(tmp_path / kind), exact=kind == "exact")[0]
                   for kind in ("exact", "cached")}
    finally:
        workers.stop()
    assert rs.phase == "paired" and rs.metrics["rollouts_exact"] == 1.0
    pairs = read_pairs(rs.pairs_uri)
    assert len(pairs) == 3

    def video(kind: str, prompt_id: str, seed: int) -> bytes:
        (uri,) = [c.video_uri for c in renders[kind] if (c.prompt_id, c.seed) == (prompt_id, seed)]
        with open(uri, "rb") as f:
            return f.read()

    for p in pairs:
        for uri, seed in ((p.winner_video_uri, p.winner_seed), (p.loser_video_uri, p.loser_seed)):
            with open(uri, "rb") as f:
                data = f.read()
            assert data == video("exact", p.prompt_id, seed) != video("cached", p.prompt_id, seed)


def test_a_stop_verdict_stops_a_resumed_align_before_its_next_round(ray_cluster, make_config, tmp_path):
    """``on_moved_pairs: stop``: the job stops before the round after the verdict with the error that names what to
    change, having written nothing of that round (here a job resumed after the verdict was recorded)."""
    from anisora_ray.loop.align import run_alignment

    cfg = make_config("generator.cache.kind=faster_cache", "generator.cache.audit_prompts=1", "loop.rounds=1",
                      "generator.cache.min_same_pair=1.0", "generator.cache.on_moved_pairs=stop", "generator.replicas=1",
                      "loop.guard.enabled=false", f"ray.address={ray_cluster.address}")
    align = tmp_path / "out" / "align"
    AlignState(baseline={"per_prompt": {}, "row": {"round": 0, "heldout_reward": 0.5, "weights_version": 0}},
               cache_audits={"0": [0, 1]}, cache_verdict={"round": 0, "same_pair_pooled": 0.0, "kept": 0, "audited": 1,
                                                          "min_same_pair": 1.0, "action": "stop"}).save(str(align / "state.json"))
    with pytest.raises(CacheDriftError, match=r"moved the pairs by round 0 \(1 of 1 audited prompts changed"):
        run_alignment(cfg, resume=True, progress=False)
    assert not (align / "round-1").exists()
    assert AlignState.load(str(align / "state.json")).rounds == []  # nothing of round 1 began
