"""`ray job submit` of the main job to a real local head node (bound to 127.0.0.1), as on a cluster."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.conftest import REPO, config_overrides, start_ray_head, stop_ray_head


@pytest.fixture
def ray_head(tmp_path):
    """A head node with the Jobs API (dashboard) on loopback; stopped with its process group."""
    from ray.job_submission import JobSubmissionClient

    head, _, dashboard = start_ray_head(tmp_path / "head.log", dashboard=True)
    deadline, client = time.time() + 120, None
    while client is None:
        try:
            client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            if head.poll() is not None or time.time() > deadline:
                stop_ray_head(head)
                pytest.skip(f"the head's Jobs API did not answer: {(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
    yield client
    stop_ray_head(head)  # a graceful stop takes ~30 s here; the group's processes go with it either way


def test_ray_job_submit_runs_the_align_job(ray_head, tmp_path, model_cache):
    from ray.job_submission import JobStatus

    from anisora_ray.pairs.writer import read_pairs

    overrides = [*config_overrides(tmp_path, model_cache), "loop.rounds=1", "gapo.steps=1", "generator.replicas=1",
                 "eval.demo_prompts=2", "eval.candidates_per_prompt=1", "loop.registered_model=null"]
    entrypoint = " ".join([sys.executable, "jobs/align.py", "--quiet", "--config", "configs/local.yaml",
                           *[f"--set {o}" for o in overrides]])
    job_id = ray_head.submit_job(entrypoint=entrypoint, runtime_env={
        "working_dir": REPO, "excludes": [".git", ".venv", "outputs", "**/__pycache__"],
        "env_vars": {"RAY_AUTH_MODE": "disabled"}})
    deadline = time.time() + 900
    while ray_head.get_job_status(job_id) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "the job did not finish in 15 minutes"
        time.sleep(2)
    logs = ray_head.get_job_logs(job_id)
    assert ray_head.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "held-out reward" in logs and "reward curve:" in logs
    align = tmp_path / "out" / "align"
    assert read_pairs(str(align / "round-1" / "pairs"))
    state = json.loads((align / "state.json").read_text())
    assert state["rounds"][0]["phase"] == "evaluated" and state["rounds"][0]["weights_version"] == 1

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "heldout_reward")) == [0, 1]
