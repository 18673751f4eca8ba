"""The main job: a driver killed while round 1 trains resumes without regenerating its pairs, continues
that training from its last checkpoint (same Ray Train run, same MLflow run, same result as an
uninterrupted training), runs round 2 on-policy, and leaves MLflow parent/child runs, metrics and
registered model versions behind."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides


def _phase(state_uri: str, index: int) -> str:
    try:
        with open(state_uri) as f:
            rounds = json.load(f)["rounds"]
    except (OSError, ValueError, KeyError):
        return ""
    return next((r["phase"] for r in rounds if r["index"] == index), "")


def _registered_steps(run_dir: str) -> list[int]:
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            return [int(r["metrics"]["step"]) for r in json.load(f)["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def _mtimes(folder) -> dict[str, float]:
    return {os.path.relpath(os.path.join(d, n), folder): os.path.getmtime(os.path.join(d, n))
            for d, _, names in os.walk(folder) for n in names}


STEPS = 30


def test_align_killed_during_training_resumes_it_on_policy_and_tracks_everything(ray_cluster, tmp_path, model_cache):
    import mlflow
    import torch

    from anisora_ray.config import load_config
    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.loop.align import run_alignment
    from anisora_ray.pairs.writer import pairs_table, read_pairs
    from anisora_ray.reward.statistics import RewardStatistics
    from anisora_ray.tracking import tracking_uri
    from anisora_ray.weights.folder import read_safetensors

    overrides = [*config_overrides(tmp_path, model_cache), "loop.rounds=2", f"gapo.steps={STEPS}", "gapo.beta=500",
                 "gapo.checkpoint_every=5",
                 "generator.replicas=1", "eval.demo_prompts=3", "eval.candidates_per_prompt=1", "eval.sample_videos=1",
                 "loop.registered_model=anisora-test", f"ray.address={ray_cluster.address}", "ray.log_to_driver=false",
                 "reward.dimensions.character.normalize.kind=zscore", "run.keep.candidate_videos=2"]
    state_uri = str(tmp_path / "out" / "align" / "state.json")
    argv = [sys.executable, os.path.join(REPO, "jobs", "align.py"), "--quiet", "--config", LOCAL_CONFIG]
    for o in overrides:
        argv += ["--set", o]
    driver = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = str(tmp_path / "out" / "ray-train" / "gapo-round-1")
    deadline = time.time() + 600
    while not _registered_steps(run_dir) and driver.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    driver.kill()  # the driver dies while round 1 trains, after a checkpoint
    _, err = driver.communicate()
    lines = err.decode().splitlines()  # quiet by default: Ray's and its workers' output went to log files
    assert len(lines) < 60 and not any("pid=" in ln or "RayTrainWorker" in ln for ln in lines), "\n".join(lines[-80:])
    assert os.path.getsize(tmp_path / "out" / "align" / "logs" / "ray-driver.log") > 0
    assert _phase(state_uri, 1) == "paired", err.decode()[-3000:]
    killed_at = _registered_steps(run_dir)
    assert killed_at and max(killed_at) < STEPS, killed_at
    round1 = tmp_path / "out" / "align" / "round-1" / "pairs"
    before = _mtimes(round1)
    assert any(name.endswith(".mp4") for name in before)

    cfg = load_config(LOCAL_CONFIG, overrides)
    result = run_alignment(cfg, resume=True, progress=False, root=REPO)

    assert _mtimes(round1) == before  # round 1's candidates and pairs were not redone
    # run.keep: a finished round's Ray Train checkpoints are deleted (default 0), its videos and per-round latent cache
    # kept (2 rounds here), all recorded; the round-1 training above still resumed from its checkpoint
    assert [sorted(r["pruned"]) for r in json.loads(open(result.state_uri).read())["rounds"]] == [["checkpoints"], ["checkpoints"]]
    assert not (tmp_path / "out" / "ray-train" / "gapo-round-1").exists() and not (tmp_path / "out" / "latent-cache").exists()
    assert os.listdir(tmp_path / "out" / "align" / "round-2" / "latent-cache")
    uninterrupted = train_gapo(cfg, pairs_table(str(round1)), str(tmp_path / "uninterrupted"), root=REPO,
                               run_name="uninterrupted")
    resumed = dict(read_safetensors(str(tmp_path / "out" / "align" / "round-1" / "weights")))
    for name, tensor in read_safetensors(uninterrupted["weights_uri"]):  # as close as `train --resume` requires
        assert torch.allclose(resumed[name], tensor, rtol=1e-5, atol=1e-7), name
    with open(result.state_uri) as f:
        state = json.load(f)
    assert [(r["index"], r["phase"], r["weights_version"]) for r in state["rounds"]] == [(1, "evaluated", 1), (2, "evaluated", 2)]
    # z-scored character: statistics frozen at round 0 (before any pairing), used by every later evaluation
    stats = RewardStatistics.load(state["statistics_uri"])
    assert state["statistics_uri"].endswith("align/reward-statistics.json") and stats.dimensions["character"].count > 1
    m = stats.dimensions["character"]
    for r in (0, 2):
        scores = pq.read_table(str(tmp_path / "out" / "align" / f"round-{r}" / "eval" / "scores.parquet")).to_pylist()
        for row in scores:
            assert row["character"] == pytest.approx(1 / (1 + math.exp(-(row["character_raw"] - m.mean) / m.std)))
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
        assert {"pairs", "heldout_reward", "train_loss", "refresh_seconds", "heldout_visual_motion", "guard_first_frame_psnr",
                "guard_fired"} <= set(child.data.metrics)
        assert child.data.metrics["refresh_live"] == 1.0, name  # streamed from the trainer's memory, then adopted
        gapo = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id]
        assert [r.info.status for r in gapo] == ["FINISHED"], name  # round 1's killed training went on in its run
        losses = client.get_metric_history(gapo[0].info.run_id, "loss")
        assert sorted(m.step for m in losses) == list(range(1, STEPS + 1)), name  # continued, none logged twice
        resumed_from = gapo[0].data.metrics["final_resumed_from_update"]
        assert (resumed_from == max(killed_at)) if name == "round-1" else (resumed_from == 0), (name, resumed_from)
    artifacts = [a.path for a in client.list_artifacts(children["round-1"].info.run_id, "pairs")]
    assert sum(a.endswith("winner-vs-loser.mp4") for a in artifacts) == 1
    assert any(a.startswith("pairs/pairs-") and a.endswith(".parquet") for a in artifacts)
    assert "train_pair_visual_motion" in children["round-1"].data.metrics
    assert {"reward_curve.png", "heldout_frames.png", "report.html"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    page = (tmp_path / "out" / "align" / "report.html").read_text()  # one self-contained page: nothing from a network
    assert page.count("<tr>") == 8 + 3 and page.count("data:video/mp4;base64,") == 6  # rounds, guard, pruned; 3 prompts x 2
    assert "Pruned by run.keep" in page and page.count("run.keep.checkpoints=0") == 2
    assert page.count("data:image/png;base64,") == 2 and "http://" not in page and "https://" not in page
    versions = sorted(client.search_model_versions("name='anisora-test'"), key=lambda v: int(v.version))
    assert [v.tags["round"] for v in versions] == ["1", "2"]
    assert versions[1].source.endswith("round-2/weights") and versions[1].run_id == children["round-2"].info.run_id

    # `anisora-ray eval` over the job: rounds it evaluated are read back (same numbers as align printed), and a
    # weights folder given by path is generated again on fresh replicas, with the job's frozen statistics
    from anisora_ray.eval.versions import evaluate_versions, resolve_versions

    align_dir = str(tmp_path / "out" / "align")
    versions = resolve_versions(["0", "2", f"r1={tmp_path / 'out' / 'align' / 'round-1' / 'weights'}"], align_dir)
    assert [v.label for v in versions] == ["round-0", "round-2", "r1"] and versions[2].align_eval is None
    comparison = evaluate_versions(cfg, versions, str(tmp_path / "eval"), run=align_dir, progress=False)
    assert comparison["means"]["round-2"]["reward"] == pytest.approx(result.rows[2]["heldout_reward"])
    gain = comparison["versions"]["round-2"]["metrics"]["reward"]
    assert gain["mean_diff"] == pytest.approx(result.rows[2]["mean_diff"])
    assert (gain["ci_low"], gain["p_value"]) == pytest.approx((result.rows[2]["ci_low"], result.rows[2]["p_value"]))
    r1 = pq.read_table(str(tmp_path / "eval" / "r1" / "eval" / "scores.parquet")).to_pylist()
    assert len(r1) == 3 and {r["weights_version"] for r in r1} == {1}
    for row in r1:  # the frozen round-0 statistics, not this set's own
        assert row["character"] == pytest.approx(1 / (1 + math.exp(-(row["character_raw"] - m.mean) / m.std)))
    assert all(0 <= comparison["means"][v]["subject_consistency"] <= 1 for v in ("round-0", "round-2", "r1"))
