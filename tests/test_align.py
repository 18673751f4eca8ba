"""The main job: a driver killed after round 1's pairs resumes without regenerating them, runs round 2
on-policy, and leaves MLflow parent/child runs, metrics and registered model versions behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides


def _phase(state_uri: str, index: int) -> str:
    try:
        with open(state_uri) as f:
            rounds = json.load(f)["rounds"]
    except (OSError, ValueError, KeyError):
        return ""
    return next((r["phase"] for r in rounds if r["index"] == index), "")


def _mtimes(folder) -> dict[str, float]:
    return {os.path.relpath(os.path.join(d, n), folder): os.path.getmtime(os.path.join(d, n))
            for d, _, names in os.walk(folder) for n in names}


def test_align_killed_after_pairs_resumes_on_policy_and_tracks_everything(ray_cluster, tmp_path, model_cache):
    import mlflow

    from anisora_ray.config import load_config
    from anisora_ray.loop.align import run_alignment
    from anisora_ray.pairs.writer import read_pairs
    from anisora_ray.tracking import tracking_uri

    overrides = [*config_overrides(tmp_path, model_cache), "loop.rounds=2", "gapo.steps=2", "gapo.beta=500",
                 "generator.replicas=1", "eval.demo_prompts=3", "eval.candidates_per_prompt=1", "eval.sample_videos=1",
                 "loop.registered_model=anisora-test", f"ray.address={ray_cluster.address}", "ray.log_to_driver=false"]
    state_uri = str(tmp_path / "out" / "align" / "state.json")
    argv = [sys.executable, os.path.join(REPO, "jobs", "align.py"), "--quiet", "--config", LOCAL_CONFIG]
    for o in overrides:
        argv += ["--set", o]
    driver = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while _phase(state_uri, 1) != "paired" and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    driver.kill()  # the driver dies between round 1's pairs and its training
    _, err = driver.communicate()
    assert _phase(state_uri, 1) == "paired", err.decode()[-3000:]
    round1 = tmp_path / "out" / "align" / "round-1" / "pairs"
    before = _mtimes(round1)
    assert any(name.endswith(".mp4") for name in before)

    cfg = load_config(LOCAL_CONFIG, overrides)
    result = run_alignment(cfg, resume=True, progress=False, root=REPO)

    assert _mtimes(round1) == before  # round 1's candidates and pairs were not redone
    with open(result.state_uri) as f:
        state = json.load(f)
    assert [(r["index"], r["phase"], r["weights_version"]) for r in state["rounds"]] == [(1, "evaluated", 1), (2, "evaluated", 2)]
    assert {p.weights_version for p in read_pairs(str(round1))} == {0}
    round2 = read_pairs(str(tmp_path / "out" / "align" / "round-2" / "pairs"))
    assert round2 and {p.weights_version for p in round2} == {1}  # on-policy: round 1's trained weights
    assert [row["round"] for row in result.rows] == [0, 1, 2]
    assert [row["weights_version"] for row in result.rows] == [0, 1, 2]
    assert all(0 <= row["heldout_reward"] <= 1 for row in result.rows)
    assert {"mean_diff", "ci_low", "ci_high", "p_value"} <= set(result.rows[2])
    assert os.path.getsize(result.curve_uri) > 10_000

    client = mlflow.MlflowClient(tracking_uri(cfg))
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["loop.rounds"] == "2" and parent.data.tags["anisora.stage"] == "align"
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "heldout_reward")) == [0, 1, 2]
    runs = client.search_runs([parent.info.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"round-1", "round-2"}
    for name, child in children.items():
        assert {"pairs", "heldout_reward", "train_loss", "refresh_seconds", "heldout_visual_motion"} <= set(child.data.metrics)
        gapo = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id]
        finished = [r for r in gapo if r.info.status == "FINISHED"]
        assert len(finished) == 1 and len(client.get_metric_history(finished[0].info.run_id, "loss")) == 2, name
        assert {r.info.status for r in gapo} <= {"FINISHED", "KILLED"}  # a run the dead driver began is closed
    artifacts = [a.path for a in client.list_artifacts(children["round-1"].info.run_id, "pairs")]
    assert sum(a.endswith("winner-vs-loser.mp4") for a in artifacts) == 1
    assert any(a.startswith("pairs/pairs-") and a.endswith(".parquet") for a in artifacts)
    assert "train_pair_visual_motion" in children["round-1"].data.metrics
    assert any(a.path == "reward_curve.png" for a in client.list_artifacts(parent.info.run_id))
    versions = sorted(client.search_model_versions("name='anisora-test'"), key=lambda v: int(v.version))
    assert [v.tags["round"] for v in versions] == ["1", "2"]
    assert versions[1].source.endswith("round-2/weights") and versions[1].run_id == children["round-2"].info.run_id
