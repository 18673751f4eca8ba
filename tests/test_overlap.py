"""``loop.overlap: one_round_off_policy``: round r + 1 is generated while round r trains; the replicas move to
round r's weights between two generation calls; pairs record their version and rounds log their staleness. The
replicas here roll out with a step cache, whose audit runs with the held-out evaluations it is due at.
(That held-out reward still rises with overlapped rounds is measured on the embedded default in
docs/alignment.md: a 3-round run is minutes, not a unit test.)"""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from tests.conftest import LOCAL_CONFIG, config_overrides


def test_overlapped_rounds_generate_while_training_and_log_staleness(ray_cluster, tmp_path, model_cache):
    import mlflow

    from anisora_ray.config import load_config
    from anisora_ray.loop.align import run_alignment
    from anisora_ray.pairs.writer import read_pairs
    from anisora_ray.tracking import tracking_uri

    overrides = [*config_overrides(tmp_path, model_cache), "loop.rounds=2", "gapo.steps=4", "gapo.beta=500",
                 "generator.replicas=1", "eval.demo_prompts=2", "eval.candidates_per_prompt=2", "eval.sample_videos=0",
                 "loop.registered_model=null", "loop.guard.enabled=false", f"ray.address={ray_cluster.address}",
                 "loop.overlap=one_round_off_policy",
                 # the replicas roll out with FasterCache, audited at rounds 0 and 2 (eval/cache_audit.py)
                 "generator.cache.kind=faster_cache", "generator.cache.audit_prompts=1", "generator.cache.audit_every=2",
                 # an audited prompt whose pair the cache moves: later rollouts compute every step (loop/cache_policy.py)
                 "generator.cache.min_same_pair=1.0", "generator.cache.on_moved_pairs=exact",
                 "eval.exact=true",  # held-out videos with every step computed: the audit's exact twins ...
                 "generator.candidates_per_prompt=2"]  # ... rendered in batches of the same size (bit for bit)
    cfg = load_config(LOCAL_CONFIG, overrides)
    result = run_alignment(cfg, progress=False)

    align = tmp_path / "out" / "align"
    with open(result.state_uri) as f:
        state = json.load(f)
    assert [(r["index"], r["phase"], r["weights_version"]) for r in state["rounds"]] == [
        (1, "evaluated", 1), (2, "evaluated", 2)]
    assert [row["weights_version"] for row in result.rows] == [0, 1, 2]  # each round evaluated on its own weights
    versions = {i: [p.weights_version for p in read_pairs(str(align / f"round-{i}" / "pairs"))] for i in (1, 2)}
    assert set(versions[1]) == {0} and len(versions[1]) == 3
    # round 2 was made while round 1 trained: with version 0, or round 1's once written
    assert versions[2] and set(versions[2]) <= {0, 1}, versions
    # round 2 was generated while round 1 trained: its pairs were written before round 1's weights
    first_pairs = min(os.path.getmtime(align / "round-2" / "pairs" / n) for n in os.listdir(align / "round-2" / "pairs")
                      if n.startswith("pairs-"))
    assert first_pairs < os.path.getmtime(align / "round-1" / "weights" / "weights_manifest.json")

    client = mlflow.MlflowClient(tracking_uri(cfg))
    # round 2's disk check ran before its pairs began, not at its own turn in the loop (after them)
    checked = [m.timestamp / 1e3 for m in client.get_metric_history(result.parent_run_id, "disk_free_gb") if m.step == 2]
    assert checked and min(checked) < first_pairs
    assert state["rounds"][1]["metrics"]["written_mb"] > 0
    for r in state["rounds"]:  # each phase's wall time, as on-policy rounds record it (benchmarks/gpu_round.py reads them)
        assert all(r["metrics"][f"{p}_wall_seconds"] > 0 for p in ("pairs", "train", "refresh", "eval")), r["metrics"]
    runs = {r.info.run_name: r for r in client.search_runs([client.get_run(result.parent_run_id).info.experiment_id])
            if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id}
    for i in (1, 2):  # staleness relative to the weights the round trains from (round i - 1's)
        m = runs[f"round-{i}"].data.metrics
        lags = [(i - 1) - v for v in versions[i]]
        assert m["pairs_staleness_mean"] == sum(lags) / len(lags) and m["pairs_staleness_max"] == max(lags)
        assert m.get("pairs_staleness_1_fraction", 0.0) == lags.count(1) / len(lags)
        assert m["refresh_live"] == 0.0  # the replicas load the written folder between two generation calls
    audits = {i: align / f"round-{i}" / "eval" / "cache_audit" / "cache_audit.parquet" for i in (0, 1, 2)}
    assert [i for i, path in audits.items() if path.exists()] == [0, 2]  # audit_every=2
    parent = client.get_run(result.parent_run_id).data.metrics
    k = cfg.generator.candidates_per_prompt  # a rollout's candidates of the one audited prompt
    assert parent["cache_audit_videos"] == k and parent["cache_audit_drift_mean_levels"] > 0  # the last: round 2's
    # the verdict on the cache: pooled over the audits of rounds 0 and 2, recorded at the first that moved a pair
    kept = {int(i): k for i, (k, n, *_signal) in state["cache_audits"].items() if n == 1}
    round2 = pq.read_table(audits[2]).to_pylist()  # the last audit's one prompt: did its best/worst pair stay?
    assert parent["cache_audit_same_pair"] == float(round2[0]["same_pair"]) == kept[2]
    assert sorted(kept) == [0, 2] and parent["cache_audit_same_pair_pooled"] == sum(kept.values()) / 2
    moved_at = next((i for i in (0, 2) if not kept[i]), None)
    assert state["cache_verdict"].get("round") == moved_at
    assert ("anisora.cache" in client.get_run(result.parent_run_id).data.tags) == (moved_at is not None)
    for i in (1, 2):  # both rounds' pairs are made after round 0's audit and before round 2's
        assert runs[f"round-{i}"].data.metrics["rollouts_exact"] == float(moved_at == 0)
    steps = {m.step for m in client.get_metric_history(result.parent_run_id, "cache_audit_reward_change")}
    assert steps == {0, 2} and "cache_audit_videos" not in runs["round-1"].data.metrics
    assert runs["round-2"].data.metrics["cache_audit_videos"] == k
    for run_id in (result.parent_run_id, runs["round-2"].info.run_id):  # round 0's audit in the job's run
        names = sorted(a.path for a in client.list_artifacts(run_id, "cache_audit"))
        assert len(names) == 2 and names[0] == "cache_audit/cache_audit.parquet" and names[1].endswith("-cached-vs-exact.mp4")
    assert not client.list_artifacts(runs["round-1"].info.run_id, "cache_audit")
    page = (align / "report.html").read_text()
    audit = page[page.index("<h2>Step cache audit</h2>"):]
    assert audit[:audit.index("</table>")].count("<tr>") == 3  # the header, rounds 0 and 2
    grid = audit[audit.index("<h3>Round 2: with the cache | every step computed</h3>"):]
    assert grid[:grid.index("</div></div></div>")].count('<div class="cell">') == 2  # its 2 videos, each both ways
    from anisora_ray.io import fs
    from anisora_ray.types import Candidate

    for i in (0, 2):  # eval.exact: each audited held-out video is its audit's exact rendering, not its cached one
        audited = {(r["prompt_id"], r["seed"]): r for r in fs.read_table(str(audits[i])).to_pylist()}
        held_out = [c for c in Candidate.from_table(fs.read_table(str(align / f"round-{i}" / "eval" / "candidates.parquet")))
                    if (c.prompt_id, c.seed) in audited]
        assert len(held_out) == 2
        for c in held_out:
            twin = audited[(c.prompt_id, c.seed)]
            assert c.frames_sha256 == twin["frames_sha256_exact"] != twin["frames_sha256_cached"]


def test_the_state_saves_while_the_other_thread_adds_metrics(tmp_path):
    """The overlapped schedule saves the state from both threads while either may add a round's metric: every save
    succeeds and loads back (``dataclasses.asdict`` raised "dictionary changed size during iteration")."""
    import sys
    import threading

    from anisora_ray.loop.state import AlignState, RoundState

    state = AlignState(rounds=[RoundState(1), RoundState(2)], guard={"findings": [{"measure": "x"}]})
    busy = state.rounds[1].metrics
    busy.update({f"m{i}": float(i) for i in range(200)})
    stop = threading.Event()

    def add_metrics() -> None:
        i = 0
        while not stop.is_set():
            busy[f"x{i % 50}"] = float(i)
            if i % 50 == 49:
                for key in [k for k in busy if k.startswith("x")]:
                    del busy[key]
            i += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    other = threading.Thread(target=add_metrics)
    other.start()
    try:
        for _ in range(200):
            state.save(str(tmp_path / "state.json"))
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(interval)
    loaded = AlignState.load(str(tmp_path / "state.json"))
    assert loaded.rounds[1].metrics["m199"] == 199.0 and loaded.guard == state.guard
