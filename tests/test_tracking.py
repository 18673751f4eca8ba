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
