"""MLflow runs land in the store their own config names, one after another in one process."""

import os

import pytest

from anisora_ray.tracking import mlflow_run, tracking_uri


def test_each_run_uses_its_own_store_and_exports_nothing(make_config, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = make_config(f"run.output_dir={tmp_path / 'a'}")
    second = make_config(f"run.output_dir={tmp_path / 'b'}")
    with mlflow_run(first, "a") as a:
        pass
    assert "MLFLOW_TRACKING_URI" not in os.environ  # mlflow.set_tracking_uri alone would export it
    with mlflow_run(second, "b") as b:
        pass
    assert tracking_uri(second).endswith(os.path.join("b", "mlflow.db"))
    assert mlflow.MlflowClient(tracking_uri(second)).get_run(b.info.run_id).info.run_name == "b"
    assert mlflow.MlflowClient(tracking_uri(first)).get_run(a.info.run_id).info.run_name == "a"
    experiment = mlflow.MlflowClient(tracking_uri(first)).get_experiment(a.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert tracking_uri(second) == f"sqlite:///{tmp_path / 'env.db'}"  # a user's setting still wins


def test_round_0_is_logged_once_whether_the_driver_was_lost_before_logging_it_or_the_guard_adds_measures(make_config):
    """The baseline row is saved before it is logged: a resumed job logs what is missing at step 0, and only that
    (a job resumed with the guard newly on adds its measures without logging the reward a second time)."""
    from mlflow.tracking import MlflowClient

    from anisora_ray.tracking import log_metrics_once, mlflow_run

    cfg = make_config()
    with mlflow_run(cfg, "round-0") as run:
        assert log_metrics_once(run.info.run_id, {"heldout_reward": 0.5, "round": 0}, step=0) == ["heldout_reward", "round"]
        assert log_metrics_once(run.info.run_id, {"heldout_reward": 0.5, "round": 0}, step=0) == []
        row = {"heldout_reward": 0.5, "round": 0, "heldout_first_frame_psnr": 31.0, "p_value": float("nan")}
        assert log_metrics_once(run.info.run_id, row, step=0) == ["heldout_first_frame_psnr"]
        client = MlflowClient()
        assert [m.value for m in client.get_metric_history(run.info.run_id, "heldout_reward")] == [0.5]


def test_the_trainers_step_log_keeps_what_mlflow_refused_and_sends_it_with_the_next_update(tmp_path):
    """Rank 0's per-update metrics: a tracking server that refuses a batch (here: the run set aside, so it takes no
    metric) no longer ends the training attempt; the update's metrics wait and go with the next one's."""
    from mlflow.tracking import MlflowClient

    from anisora_ray.gapo.trainer import StepLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("steps")).info.run_id
    logger = StepLogger(uri, run)
    logger.log({"loss": 0.7}, 1)
    client.delete_run(run)  # refuses every write until restored
    logger.log({"loss": 0.6, "grad_norm": 2.0}, 2)  # raised before
    assert len(logger.pending) == 2
    client.restore_run(run)
    logger.log({"loss": 0.5, "grad_norm": 1.0}, 3)
    assert logger.pending == []
    assert [(m.step, m.value) for m in client.get_metric_history(run, "loss")] == [(1, 0.7), (2, 0.6), (3, 0.5)]
    logger.log({"loss": 0.1}, 3)  # an update it holds already (a restart replays it): not logged twice
    assert len(client.get_metric_history(run, "loss")) == 3


def test_round_weights_register_on_a_tracking_server_that_serves_artifacts(tmp_path, monkeypatch):
    """The cluster's MLflow (cluster/kuberay/mlflow.yaml: `mlflow server --serve-artifacts`) refuses a model version
    whose source is outside the run's artifacts: registering the weights folder by its path stopped every real job
    at round 1's refresh. A pointer logged to the run is registered instead; a refusal is said, not raised."""
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from anisora_ray.loop.report import register_weights

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts",
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        client = MlflowClient()
        run = client.create_run(client.create_experiment("registry")).info.run_id
        weights = tmp_path / "align" / "round-1" / "weights"
        weights.mkdir(parents=True)
        client.create_registered_model("gen")
        with pytest.raises(MlflowException, match="source"):  # what the old code sent
            client.create_model_version("gen", source=str(weights), run_id=run)
        version = register_weights("gen", str(weights), run, 1, 1)
        registered = client.get_model_version("gen", version)
        assert registered.tags["weights_uri"] == str(weights) and registered.run_id == run
        pointer = json.load(open(client.download_artifacts(run, "registered-weights/round-1/weights.json")))
        assert pointer == {"weights_uri": str(weights), "round": 1, "weights_version": 1}
        assert register_weights("gen", str(weights), "0" * 32, 2, 2) is None  # refused (no such run): said, not raised
    finally:
        server.terminate()
        server.wait(timeout=30)
        mlflow.set_tracking_uri(None)
