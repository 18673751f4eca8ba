"""MLflow runs land in the store their own config names, one after another in one process."""

import os

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
