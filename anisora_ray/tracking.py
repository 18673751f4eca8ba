"""MLflow tracking: where the store is, and runs that carry the resolved config.

The store is ``MLFLOW_TRACKING_URI`` if set, else ``tracking.tracking_uri``, else a SQLite store
inside the run's output dir (MLflow 3's file store is in maintenance mode). Artifacts of a
default local store go next to it, never into the current directory.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import ConfigError

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


# MLflow 3's UI opens an experiment in its GenAI view (traces, prompts) unless told it trains models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(cfg: AnisoraConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    out = cfg.run.output_dir
    if "://" in out and not out.startswith("file://"):
        raise ConfigError(f"run.output_dir {out!r} is remote: set tracking.tracking_uri (or MLFLOW_TRACKING_URI)")
    root = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def use_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect of exporting ``MLFLOW_TRACKING_URI``:
    that would make this run's store outrank the config of every later run in this process and
    leak into the processes it starts (a Ray head, a job)."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _experiment_id(cfg: AnisoraConfig) -> str:
    import mlflow

    name = cfg.tracking.experiment
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND[0]) is None:  # made by an older version: mark it too
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:///"):
        db = mlflow.get_tracking_uri().removeprefix("sqlite:///")
        location = "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
    try:
        return mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except Exception:  # created concurrently by another process
        return mlflow.get_experiment_by_name(name).experiment_id


def params_of(cfg: AnisoraConfig) -> dict[str, str]:
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in cfg.flat().items()}


@contextlib.contextmanager
def mlflow_run(cfg: AnisoraConfig, run_name: str, *, parent_run_id: str | None = None,
               tags: Mapping[str, str] | None = None, log_config: bool = True, run_id: str | None = None) -> Iterator[Any]:
    """Start (or nest under ``parent_run_id``) an MLflow run; the whole config is logged as params.

    ``run_id``: continue that run (a resumed job keeps its runs); its params are not logged again.
    """
    import mlflow

    use_tracking_uri(tracking_uri(cfg))
    if run_id:
        with mlflow.start_run(run_id=run_id, nested=bool(parent_run_id)) as run:
            yield run
        return
    experiment_id = _experiment_id(cfg)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=all_tags, nested=bool(parent_run_id)) as run:
        if log_config:
            mlflow.log_params(params_of(cfg))
        yield run


def new_run(cfg: AnisoraConfig, run_name: str, *, parent_run_id: str | None = None,
            tags: Mapping[str, str] | None = None) -> str:
    """Create a run (config as params) to be continued later with ``mlflow_run(run_id=...)``; returns its id."""
    with mlflow_run(cfg, run_name, parent_run_id=parent_run_id, tags=tags) as run:
        return run.info.run_id


def log_startup(metrics: Mapping[str, float]) -> None:
    """Log start-up metrics (load and compile seconds) to the active run, if one is active."""
    import mlflow

    if mlflow.active_run() is not None:
        log_metrics(metrics)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` to the active run."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_metrics_once(run_id: str, metrics: Mapping[str, float], step: int) -> list[str]:
    """Log to run ``run_id`` the finite entries of ``metrics`` that it has no value of at ``step`` yet (a resumed job
    logs what a lost driver had not, and nothing twice); returns the keys logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    missing = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))
               and not any(m.step == step for m in client.get_metric_history(run_id, k))}
    if missing:
        import mlflow

        mlflow.log_metrics(missing, step=step, run_id=run_id)
    return sorted(missing)
