"""Runs are reproducible with lossless video, survive losing the head node, and lose nothing under random
faults. Two fresh runs of a short alignment loop (the soak's suite sizes, same config and seeds) run at the same
time: one on its own local Ray, the other on a `ray start` head that is SIGKILLed mid-round with its driver (GCS,
raylet, workers, driver: all gone). A new head comes up (with the Jobs API on loopback), the job is submitted to
it again with ``--resume`` through `ray job submit`'s API (jobs/align.py, the repo uploaded as the working dir,
as the KubeRay RayJob does), and ends with no prompt lost or paired twice, the same held-out table and
byte-identical trained weights (``video.crf=0``; lossy x264 at tiny sizes is not bit-stable, see
configs/local.yaml), its MLflow run continued and finished. The undisturbed run is then the reference of the
short soak (benchmarks/soak.py): the same job under seeded SIGKILLs of replicas, reward actors, Ray Data and Ray
Train workers pairs every prompt once and gives the same pairs and table (the long soak: docs/reliability.md)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.soak import suite_size_overrides
from tests.conftest import LOCAL_CONFIG, REPO, start_ray_head, stop_ray_head

KEYS = ("round", "weights_version", "heldout_reward", "mean_diff", "ci_low", "ci_high", "p_value", "wins", "pairs",
        "train_loss", "heldout_visual_motion", "heldout_character")
PROMPTS = 4  # suite_size_overrides' data.demo_prompts
ROUNDS = 1


def _start(root, model_cache, address: str | None = None) -> subprocess.Popen:
    overrides = [*suite_size_overrides(str(root), ROUNDS, model_cache), *([f"ray.address={address}"] if address else [])]
    argv = [sys.executable, "-m", "anisora_ray.cli", "align", "--quiet", "--config", LOCAL_CONFIG]
    for o in overrides:
        argv += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no address: a fresh local Ray, as `make demo`
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "output.txt"), "a") as output:  # files, not pipes: neither run waits on a reader
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)


def _submit(client, root, model_cache) -> str:
    """The resumed job, submitted to the new head's Jobs API as `ray job submit -- python jobs/align.py` would."""
    argv = ["jobs/align.py", "--quiet", "--resume", "--config", "configs/local.yaml"]
    for o in suite_size_overrides(str(root), ROUNDS, model_cache):
        argv += ["--set", o]
    return client.submit_job(entrypoint=" ".join([sys.executable, *argv]), runtime_env={
        "working_dir": REPO, "excludes": [".git", ".venv", "outputs", "**/__pycache__"],
        "env_vars": {"RAY_AUTH_MODE": "disabled"}})


def _job_result(client, job_id: str, root) -> tuple[list[dict], str]:
    from ray.job_submission import JobStatus

    deadline = time.time() + 900
    while client.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the resubmitted job did not finish in 15 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-6000:]
    assert "held-out reward" in logs and "reward curve:" in logs, logs[-3000:]
    return _table(root)


def _result(run: subprocess.Popen, root) -> tuple[list[dict], str]:
    run.wait(timeout=900)
    with open(os.path.join(root, "output.txt")) as f:
        assert run.returncode == 0, f.read()[-6000:]
    return _table(root)


def _table(root) -> tuple[list[dict], str]:
    with open(os.path.join(root, "align", "state.json")) as f:
        state = json.load(f)
    rows = [state["baseline"]["row"], *(r["metrics"] for r in state["rounds"])]
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "align", "round-1", "weights", "*.safetensors"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    weights = digest.hexdigest()
    return [{k: r.get(k) for k in KEYS} for r in rows], weights


def _pairs_shards(root) -> list[str]:
    return glob.glob(os.path.join(root, "align", "round-1", "pairs", "pairs-*.parquet"))


def _round1(root) -> tuple[int, str]:
    """Round 1's videos so far, and its phase."""
    videos = glob.glob(os.path.join(root, "align", "round-1", "pairs", "videos", "*", "*.mp4"))
    try:
        with open(os.path.join(root, "align", "state.json")) as f:
            phase = next((r["phase"] for r in json.load(f)["rounds"] if r["index"] == 1), "")
    except (OSError, ValueError, KeyError):
        phase = ""
    return len(videos), phase


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_cache) -> dict:
    """The undisturbed run and the head-loss run (killed, resumed on a new head), each finished."""
    root = tmp_path_factory.mktemp("reproducible")
    undisturbed, killed = root / "a", root / "b"
    procs: dict[str, subprocess.Popen] = {}
    try:
        return {"undisturbed": undisturbed, "killed": killed, **_run(procs, undisturbed, killed, root, model_cache)}
    finally:  # a failed check leaves no driver running
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=60)


def _run(procs, undisturbed, killed, tmp_path, model_cache) -> dict:
    head, address, _ = start_ray_head(tmp_path / "head-1.log")
    try:
        procs.update(a=_start(undisturbed, model_cache), b=_start(killed, model_cache, address))
        deadline = time.time() + 600
        while _round1(killed)[0] < 2 and procs["b"].poll() is None and time.time() < deadline:
            time.sleep(0.05)  # mid-round: round 1 is generating its candidates
        # the head node goes, and the driver with it (on a cluster the driver runs on the head)
        os.killpg(head.pid, signal.SIGKILL)
        procs["b"].kill()
        head.wait(timeout=30)
        procs["b"].wait(timeout=30)
        videos, phase = _round1(killed)
        written = len(_pairs_shards(killed))
    finally:
        stop_ray_head(head, signal.SIGKILL)
    first = _result(procs["a"], undisturbed)  # (a new head on a machine this small starts faster without it)
    began = time.perf_counter()
    head, _, dashboard = start_ray_head(tmp_path / "head-2.log", dashboard=True)  # nothing of the old cluster's state
    try:
        client = _jobs_client(head, dashboard, tmp_path / "head-2.log")
        job_id = _submit(client, killed, model_cache)
        try:
            second = _job_result(client, job_id, killed)
        finally:  # a failed check leaves no job running
            client.stop_job(job_id)
    finally:
        stop_ray_head(head)
    return {"first": first, "second": second, "videos": videos, "phase": phase, "written": written,
            "resume_seconds": time.perf_counter() - began}


def _jobs_client(head: subprocess.Popen, dashboard: int, log_path):
    """The head's Jobs API (the dashboard, on loopback), once it answers."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 120
    while True:
        try:
            return JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            assert head.poll() is None and time.time() < deadline, \
                f"the new head's Jobs API did not answer: {open(log_path).read()[-2000:]}"
            time.sleep(1)


def test_two_fresh_runs_give_the_same_table_and_weights_even_when_one_loses_its_head_node(runs):
    from anisora_ray.pairs.writer import read_pairs, read_skipped

    first, second = runs["first"], runs["second"]
    assert runs["videos"] >= 2 and runs["phase"] in ("", "started"), f"the kill missed round 1's pairs ({runs})"
    pairs_uri = str(runs["killed"] / "align" / "round-1" / "pairs")
    ids = [p.prompt_id for p in read_pairs(pairs_uri)] + [q.item_id for q in read_skipped(pairs_uri)]
    print(f"\nhead-loss: lost={PROMPTS - len(set(ids))} duplicated={len(ids) - len(set(ids))} "
          f"videos_before={runs['videos']} prompts_written_before={runs['written']} "
          f"resume_seconds={runs['resume_seconds']:.1f}")
    assert sorted(ids) == sorted(set(ids)) and len(ids) == PROMPTS  # none lost, none twice
    assert first[0] == second[0]  # every number of the table, exactly
    assert first[1] == second[1]  # the trained weights, byte for byte
    assert first[0][1]["pairs"] == len(read_pairs(pairs_uri)) and first[0][1]["weights_version"] == 1

    import mlflow  # the resubmitted driver continued the killed driver's MLflow run and finished it

    state = json.loads((runs["killed"] / "align" / "state.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{runs['killed'] / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "heldout_reward")) == [0, 1]


def test_a_short_soak_loses_nothing_and_repeats_the_undisturbed_run(runs, tmp_path, model_cache):
    out = tmp_path / "soak"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "soak.py"), "--rounds", str(ROUNDS),
                           "--fault-every", "15", "--seed", "1", "--calm", str(runs["undisturbed"]), "--out", str(out),
                           "--model-cache", model_cache],
                          cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((out / "soak.json").read_text())
    faults = result["runs"]["faults"]["faults"]
    kinds = ("GeneratorActor", "DimensionActor", "MapWorker", "RayTrainWorker", "RayDataTask")
    assert faults and all(f["target"] in kinds for f in faults)
    assert result["checks"] == {**result["checks"], "lost": 0, "duplicated": 0, "same_pairs": True, "same_table": True}
    samples = result["runs"]["faults"]["samples"]
    assert sorted(samples) == ["0", "1"] and all(s["driver_rss_mb"] > 0 and s["output_mb"] > 0 for s in samples.values())
    assert all(0 < s["log_monitor_fds"] and 0 < s["ray_fds"] for s in samples.values())  # Ray's log monitor found, apart
    assert (out / "soak.png").stat().st_size > 10_000 and "slope" in (out / "soak.md").read_text()
