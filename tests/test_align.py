"""The main job, killed in every phase of round 1: the ``align`` driver is SIGKILLed during round 1's pairs,
while it trains (after a checkpoint), during its refresh and during its held-out evaluation; ``--resume`` after
each finishes the job with no prompt lost or paired twice, finished prompts not redone, the training continued
from its last checkpoint (same Ray Train run, same MLflow run, same result as an uninterrupted training).
Faults while recovering, in round 2 of the resumed job: a generator replica is SIGKILLed, then SIGKILLed again
while Ray restarts it (its constructor loading the model and round 1's weights), and the same for a reward actor;
the round still pairs every prompt once, on-policy. The job leaves MLflow parent/child runs, metrics and registered
model versions behind, and `anisora-ray eval` reads it back. (Losing the head node: tests/test_reproducible.py.)"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides


def _state(state_uri: str) -> dict:
    try:
        with open(state_uri) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _phase(state_uri: str, index: int) -> str:
    return next((r["phase"] for r in _state(state_uri).get("rounds", []) if r["index"] == index), "")


def _shards(folder: str) -> dict[str, float]:
    if not os.path.isdir(folder):
        return {}
    return {n: os.path.getmtime(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".parquet")}


def _kill_driver_when(argv: list[str], ready, timeout_s: float = 600) -> tuple[str, str]:
    """Start the driver, SIGKILL it once ``ready()`` holds; returns what ``ready`` saw (or raises) and its stderr."""
    driver = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    seen = ""
    while driver.poll() is None and time.time() < deadline:
        seen = ready()
        if seen:
            break
        time.sleep(0.05)
    driver.kill()
    _, err = driver.communicate()
    assert seen, f"the driver ended before the moment to kill it: {err.decode()[-3000:]}"
    return seen, err.decode()


def _constructing(class_name: str, exclude: int) -> int | None:
    """A process running ``class_name``'s constructor: Ray titles it ``ray::<class>.__init__``."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] != exclude and " ".join(proc.info["cmdline"] or []).startswith(f"ray::{class_name}.__init__"):
            return proc.info["pid"]
    return None


def _kill_twice(class_name: str, ready, killed: list, timeout_s: float = 600) -> None:
    """Once ``ready()``: SIGKILL a live actor of ``class_name``, then the process Ray restarts it in, while its
    constructor runs."""
    from ray._private.state import actors  # the GCS actor table

    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            return
        time.sleep(0.05)
    first = next(a["Pid"] for a in actors().values() if a["ActorClassName"].endswith(class_name) and a["State"] == "ALIVE")
    os.kill(first, signal.SIGKILL)
    killed.append((class_name, "alive", first))
    while time.time() < deadline:
        again = _constructing(class_name, exclude=first)
        if again:
            os.kill(again, signal.SIGKILL)
            killed.append((class_name, "restarting", again))
            return
        time.sleep(0.02)


def _videos(folder) -> int:
    return sum(n.endswith(".mp4") for _, _, names in os.walk(folder) for n in names)


def _registered_steps(run_dir: str) -> list[int]:
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            return [int(r["metrics"]["step"]) for r in json.load(f)["checkpoint_results"]]
    except (OSError, ValueError, KeyError):
        return []


def _mtimes(folder) -> dict[str, float]:
    return {os.path.relpath(os.path.join(d, n), folder): os.path.getmtime(os.path.join(d, n))
            for d, _, names in os.walk(folder) for n in names}


STEPS = 15  # checkpoints at 5 and 10: the driver is killed after the first, well before the end


def test_align_killed_in_every_phase_resumes_on_policy_and_tracks_everything(ray_cluster, tmp_path, model_cache):
    import mlflow
    import torch

    from anisora_ray.config import load_config
    from anisora_ray.errors import DiskSpaceError
    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.loop.align import run_alignment
    from anisora_ray.pairs.writer import pairs_table, read_pairs, read_skipped
    from anisora_ray.reward.statistics import RewardStatistics
    from anisora_ray.tracking import tracking_uri
    from anisora_ray.weights.folder import read_safetensors

    overrides = [*config_overrides(tmp_path, model_cache), "loop.rounds=2", f"gapo.steps={STEPS}", "gapo.beta=500",
                 "gapo.checkpoint_every=5", "data.demo_prompts=4", "pairs.flush_every=1",
                 "generator.replicas=1", "eval.demo_prompts=3", "eval.candidates_per_prompt=1", "eval.sample_videos=1",
                 "loop.registered_model=anisora-test", f"ray.address={ray_cluster.address}", "ray.log_to_driver=false",
                 "reward.dimensions.character.normalize.kind=zscore", "run.keep.candidate_videos=2"]
    out = tmp_path / "out" / "align"
    state_uri, round1 = str(out / "state.json"), out / "round-1" / "pairs"
    argv = [sys.executable, os.path.join(REPO, "jobs", "align.py"), "--quiet", "--resume", "--config", LOCAL_CONFIG]
    for o in overrides:
        argv += ["--set", o]
    began = time.perf_counter()

    # 1. during round 1's pairs: some prompts are written, the phase is not finished
    _kill_driver_when(argv, lambda: "pairs" if _shards(str(round1)) and _phase(state_uri, 1) in ("", "started") else "")
    written_before = _shards(str(round1))
    assert written_before and _phase(state_uri, 1) in ("", "started")
    # 2. while round 1 trains, after a checkpoint
    run_dir = str(tmp_path / "out" / "ray-train" / "gapo-round-1")
    _, err = _kill_driver_when(argv, lambda: "train" if _registered_steps(run_dir) else "")
    lines = err.splitlines()  # quiet by default: Ray's and its workers' output went to log files
    assert len(lines) < 60 and not any("pid=" in ln or "RayTrainWorker" in ln for ln in lines), "\n".join(lines[-80:])
    assert os.path.getsize(out / "logs" / "ray-driver.log") > 0
    assert _phase(state_uri, 1) == "paired", err[-3000:]
    killed_at = _registered_steps(run_dir)
    assert killed_at and max(killed_at) < STEPS, killed_at
    before = _mtimes(round1)
    assert any(name.endswith(".mp4") for name in before)
    # 3. during round 1's refresh: trained, not yet refreshed (the kill may land a moment later)
    phases = [_kill_driver_when(argv, lambda: _phase(state_uri, 1) if _phase(state_uri, 1) == "trained" else "")[0]]
    # 4. during round 1's held-out evaluation
    phases.append(_kill_driver_when(argv, lambda: _phase(state_uri, 1) if _phase(state_uri, 1) == "refreshed" else "")[0])

    # 5. the last resume; in its round 2 a replica and a reward actor are each killed, then killed again restarting
    pairs2 = out / "round-2" / "pairs"
    killed: list = []
    killers = [threading.Thread(target=_kill_twice, args=(name, lambda n=n: _videos(pairs2) >= n, killed), daemon=True)
               for name, n in (("GeneratorActor", 2), ("DimensionActor", 6))]
    for killer in killers:
        killer.start()
    cfg = load_config(LOCAL_CONFIG, overrides)
    result = run_alignment(cfg, resume=True, progress=False, root=REPO)
    seconds = time.perf_counter() - began
    for killer in killers:
        killer.join(timeout=5)
    assert [(c, when) for c, when, _ in sorted(killed)] == [("DimensionActor", "alive"), ("DimensionActor", "restarting"),
                                                         ("GeneratorActor", "alive"), ("GeneratorActor", "restarting")]
    for folder in (round1, pairs2):
        got = read_pairs(str(folder))
        ids = [p.prompt_id for p in got] + [q.item_id for q in read_skipped(str(folder))]
        print(f"\n{folder.parent.name}: lost={4 - len(set(ids))} duplicated={len(ids) - len(set(ids))}")
        assert len(ids) == len(set(ids)) == 4 and {p.weights_version for p in got} == {int(folder.parent.name[-1]) - 1}
    print(f"driver kills (pairs, training at update {max(killed_at)}, {phases[0]}, {phases[1]}), then "
          f"{[(c, w) for c, w, _ in killed]} in round 2: {seconds:.1f} s")
    assert all(_shards(str(round1))[name] == mtime for name, mtime in written_before.items())  # finished prompts not redone
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
    assert [row["round"] for row in result.rows] == [0, 1, 2]
    # run.free_space: each round's footprint measured (before pruning) and the disk's free space logged per round
    assert all(r["metrics"]["written_mb"] > 0.01 for r in state["rounds"]), [r["metrics"] for r in state["rounds"]]
    assert [row["weights_version"] for row in result.rows] == [0, 1, 2]
    assert all(0 <= row["heldout_reward"] <= 1 for row in result.rows)
    assert {"mean_diff", "ci_low", "ci_high", "p_value"} <= set(result.rows[2])
    assert os.path.getsize(result.curve_uri) > 10_000

    client = mlflow.MlflowClient(tracking_uri(cfg))
    parent = client.get_run(result.parent_run_id)
    assert parent.data.params["loop.rounds"] == "2" and parent.data.tags["anisora.stage"] == "align"
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "heldout_reward")) == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "eval_wall_seconds")] == [0]  # round 0's
    runs = client.search_runs([parent.info.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"round-1", "round-2"}
    for name, child in children.items():
        assert {"pairs", "heldout_reward", "train_loss", "refresh_seconds", "heldout_visual_motion", "guard_first_frame_psnr",
                "guard_fired", "eval_wall_seconds"} <= set(child.data.metrics)
        if name == "round-2":  # (round 1's refresh was killed: the resumed job refreshed from storage)
            assert child.data.metrics["refresh_live"] == 1.0  # streamed from the trainer's memory, then adopted
        gapo = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == child.info.run_id]
        assert [r.info.status for r in gapo] == ["FINISHED"], name  # round 1's killed training went on in its run
        losses = client.get_metric_history(gapo[0].info.run_id, "loss")
        assert sorted(m.step for m in losses) == list(range(1, STEPS + 1)), name  # continued, none logged twice
        resumed_from = gapo[0].data.metrics["final_resumed_from_update"]
        assert (resumed_from == max(killed_at)) if name == "round-1" else (resumed_from == 0), (name, resumed_from)
    assert {m.step for m in client.get_metric_history(parent.info.run_id, "disk_free_gb")} == {1, 2}
    assert {m.step for m in client.get_metric_history(parent.info.run_id, "driver_rss_mb")} == {1, 2}
    assert {m.step for m in client.get_metric_history(parent.info.run_id, "written_mb")} == {1, 2}
    with pytest.raises(DiskSpaceError, match=r"round 3 needs .* \(run\.free_space\.rounds=1e\+09 x"):  # sized by them
        run_alignment(load_config(LOCAL_CONFIG, [*overrides, "loop.rounds=3", "run.free_space.rounds=1e9"]), resume=True)
    artifacts = [a.path for a in client.list_artifacts(children["round-1"].info.run_id, "pairs")]
    assert sum(a.endswith("winner-vs-loser.mp4") for a in artifacts) == 1
    assert "pairs/pairs.parquet" in artifacts and not any(a.endswith("-00000.parquet") for a in artifacts)  # a table a kind
    assert "train_pair_visual_motion" in children["round-1"].data.metrics
    assert {"reward_curve.png", "heldout_frames.png", "report.html"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    page = (tmp_path / "out" / "align" / "report.html").read_text()  # one self-contained page: nothing from a network
    assert page.count("<tr>") == 8 + 3 and page.count("data:video/mp4;base64,") == 6  # rounds, guard, pruned; 3 prompts x 2
    assert "Pruned by run.keep" in page and page.count("run.keep.checkpoints=0") == 2
    assert page.count("data:image/png;base64,") == 2 and "http://" not in page and "https://" not in page
    versions = sorted(client.search_model_versions("name='anisora-test'"), key=lambda v: int(v.version))
    assert [v.tags["round"] for v in versions] == ["1", "2"]
    assert versions[1].tags["weights_uri"].endswith("round-2/weights") and versions[1].run_id == children["round-2"].info.run_id
    # registered from the round run's own artifacts (a pointer to the folder): a tracking server that serves
    # artifacts refuses a source outside them, which stopped every real job at round 1's refresh
    assert versions[1].source == client.get_run(children["round-2"].info.run_id).info.artifact_uri + \
        "/registered-weights/round-2"
    pointer = client.download_artifacts(children["round-2"].info.run_id, "registered-weights/round-2/weights.json")
    assert json.load(open(pointer))["weights_uri"] == versions[1].tags["weights_uri"]

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
    table = (tmp_path / "eval" / "comparison.md").read_text()  # the paper's layout first, as docs/evaluation.md says
    assert table.startswith("| version | VBench-I2V:") and table.index("| round-2 |") < table.index("| metric |")
