"""GAPO training of the generator's transformer with Ray Train + DeepSpeed (gloo on CPU, NCCL on GPU).

Each Ray Train worker runs one :class:`~anisora_ray.gapo.engine.GapoWorker` (policy engine, frozen
reference, pair encoder) on its share of the pairs table (a small table of URIs and rewards, put once in the
object store: every worker reads all of it and keeps its own rows, so no Ray Dataset is needed). Every
``gapo.checkpoint_every`` optimizer updates and at the end (unless ``gapo.final_checkpoint`` is off) all ranks
report a checkpoint (DeepSpeed state + update count) into the run's storage; Ray Train restarts a failed worker group from the
last one (``gapo.max_failures``), and a run started again under the same ``storage_name``
(``align --resume``) continues from it. At the end the ranks write the publishable weights
straight to ``out_uri`` (ZeRO-3 partitions gathered a bucket at a time, rank 0 writes): the driver
never downloads a checkpoint or holds a weight; it reads the folder's manifest. Rank 0 logs every
update's metrics (averaged over workers) to MLflow.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import pyarrow as pa

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import WeightsError
from anisora_ray.gapo.batches import pair_rows, worker_rows
from anisora_ray.gapo.checkpoint import read_training_state
from anisora_ray.gapo.engine import GapoWorker, deepspeed_config
from anisora_ray.weights.state import scheme_of

log = logging.getLogger(__name__)

__all__ = ["deepspeed_config", "train_gapo", "train_loop_per_worker"]


class StepLogger:
    """Rank 0's per-update MLflow metrics (the driver opened the run). Updates the run already holds
    (logged before a restart from an earlier checkpoint) are not logged twice."""

    BATCH = 1000  # MLflow's most metrics per log_batch

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.logged = max((m.step for m in self.client.get_metric_history(run_id, "loss")), default=0)
        self.pending: list = []  # metrics the tracking server did not take yet

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log an update's metrics; while the tracking server refuses them (away, locked) they wait and go with the
        next update's: training does not stop for it (an error here ended the attempt on rank 0 alone)."""
        from mlflow.entities import Metric

        if step <= self.logged:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.logged = step
        try:
            while self.pending:
                self.client.log_batch(self.run_id, metrics=self.pending[: self.BATCH])
                self.pending = self.pending[self.BATCH:]
        except Exception as exc:  # noqa: BLE001 - whatever the tracking server says, the update is done
            log.warning("update %d: MLflow did not take its metrics (%s: %s); %d metric(s) wait for the next update",
                        step, type(exc).__name__, str(exc).splitlines()[0][:200], len(self.pending))


def _report(worker: GapoWorker, metrics: dict, with_checkpoint: bool = True) -> None:
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        worker.save(folder, metrics)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _held_already(refresh: dict, version: int) -> bool:
    """Whether a replica holds ``version`` or a later one: streamed before this attempt restarted from an earlier
    checkpoint (the update replays exactly; a replica refuses a version that is not newer). Rank 0 asks the replicas
    and every rank takes its answer, so all of them skip the refresh together (its ZeRO-3 gathers are collectives)."""
    import ray
    import torch.distributed as dist

    answer = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            held = ray.get([a.get_weights_version.remote() for a in refresh["actors"]], timeout=600)
            answer = [max(held, default=-1) >= version]
        except Exception as exc:  # noqa: BLE001 - said to every rank: the refresh is tried (and may fail alone)
            log.warning("could not ask the replicas which weights they hold (%s): sending version %d", exc, version)
            answer = [False]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    return bool(answer[0])


def _refresh_replicas(worker: GapoWorker, refresh: dict, version: int):
    """The live weights from rank 0 to the replicas, streamed (a collective under ZeRO-3: every rank takes
    part); returns the update's metadata on rank 0 (None: not sent, the replicas hold it already; False: it failed
    on some replica, which a later refresh repairs)."""
    if worker.resumed_from and _held_already(refresh, version):
        if worker.rank == 0:
            log.info("update %d: the replicas hold weights version %d already (sent before the restart)", worker.update,
                     version)
        return None
    start = time.perf_counter()
    try:
        streamed = worker.stream(refresh["actors"], refresh.get("nodes"), version, refresh["bucket_mb"],
                                 transport=refresh.get("transport", "auto"))
    except WeightsError as exc:  # rank 0 alone, after the gathers: training goes on, a later refresh repairs them
        log.warning("update %d: live refresh to weights version %d failed (%s); training goes on, the next refresh "
                    "(or the round's, from storage) reaches the replicas", worker.update, version,
                    str(exc).splitlines()[0][:300])
        return False
    if streamed is None:
        return None
    meta, reports = streamed
    log.info("update %d: %d replica(s) at weights version %d (%.1f MB streamed in %.2fs)", worker.update,
             len(reports), version, meta.version.num_bytes / 1e6, time.perf_counter() - start)
    return meta


def _load_rows(pairs, rank: int, world: int) -> list[dict]:
    import ray

    return worker_rows(pair_rows(ray.get(pairs)), rank, world)  # every worker sees all pairs, keeps its own


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = AnisoraConfig.model_validate(config["cfg"])
    g = cfg.gapo
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    worker = GapoWorker(cfg, config["pretrained"], config["deepspeed"], ray.train.torch.get_device(), rank=rank,
                        init_uri=config.get("init_uri"), cache_uri=config["cache_uri"] if g.cache_latents else None)
    checkpoint = ray.train.get_checkpoint()  # Ray Train's restore: a restarted worker group or a resumed run
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    restored = {}
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            worker.load(folder)
            restored = read_training_state(folder).get("metrics", {})
        if rank == 0:
            log.info("GAPO resumes after update %d of %d", worker.update, g.steps)
    worker.prepare(_load_rows(config["pairs"], rank, world))
    if worker.quarantined:  # pairs whose videos or images cannot be read: recorded with the reason, not trained on
        from anisora_ray.io import fs
        from anisora_ray.types import QuarantineRecord

        uri = fs.join(config["quarantine_uri"], f"rank-{rank}.parquet")
        fs.write_table(QuarantineRecord.to_table(worker.quarantined), uri)
        log.warning("rank %d: %d pair(s) quarantined (%s), listed in %s", rank, len(worker.quarantined),
                    "; ".join(f"{q.uri}: {q.reason}" for q in worker.quarantined[:3]), uri)
        if not worker.rows:
            raise ValueError(f"rank {rank}: every one of its pairs was quarantined (listed in {uri}); nothing to train on")
    logger = StepLogger(*config["mlflow"]) if rank == 0 and config.get("mlflow") else None
    refresh = config.get("refresh")
    metrics, trained = restored, False
    while worker.update < g.steps:
        trained = True
        metrics = worker.step_metrics(worker.train_update())
        step = worker.update
        if refresh and g.refresh_every and step % g.refresh_every == 0 and step < g.steps:
            version = refresh["base_version"] + step // g.refresh_every
            if _refresh_replicas(worker, refresh, version) is not False:  # False: it failed (rank 0 says so)
                metrics["weights_version"] = version
        if logger:
            logger.log(metrics, step)
        if step < g.steps and g.checkpoint_every and step % g.checkpoint_every == 0:
            _report(worker, metrics)
    out_uri, extra = config["out_uri"], {"step": worker.update}
    if refresh and refresh.get("final"):  # written and streamed live to the replicas in one walk over the weights
        version = refresh["base_version"] + (g.steps - 1) // g.refresh_every + 1 if g.refresh_every else refresh["base_version"] + 1
        start = time.perf_counter()
        gpu_route = refresh.get("transport", "auto") != "host" and worker.device.type == "cuda"  # verified with fp
        done = worker.export_and_stream(out_uri, g.refresh_bucket_mb, extra, refresh["actors"], refresh.get("nodes"),
                                        version, refresh.get("transport", "auto"), fingerprint=gpu_route)
        manifest, streamed, error = done if done is not None else (None, None, None)
        if error is not None:  # the weights are written: the caller refreshes from storage
            log.warning("live refresh to version %d failed (%s); the replicas will load %s instead", version,
                        str(error).splitlines()[0][:300], out_uri)
        if streamed is not None:
            meta = streamed[0]
            written = manifest.get("checksum_fp" if scheme_of(meta.version.checksum) == "fp" else "checksum", "")
            if meta.version.checksum != written:
                raise RuntimeError(f"weights streamed to the replicas (checksum {meta.version.checksum[:15]}) differ from "
                                   f"those written to {out_uri} ({written[:15] or 'no checksum of that scheme'})")
            metrics.update(live_weights_version=version, live_refresh_seconds=time.perf_counter() - start)
    else:
        manifest = worker.export(out_uri, g.refresh_bucket_mb, extra)
    if rank == 0:
        log.info("GAPO weights after update %d written to %s (%s, %d tensors)", worker.update, out_uri,
                 manifest["kind"], manifest["num_tensors"])
    # a run restored at its last update has that checkpoint already
    _report(worker, metrics, with_checkpoint=trained and g.final_checkpoint)
    return metrics  # rank 0's: the result's metrics also when the last report carries no checkpoint


def train_gapo(cfg: AnisoraConfig, table: pa.Table, out_uri: str | None = None, root: str | None = None, *,
               init_uri: str | None = None, resume_from: str | None = None, run_name: str = "gapo",
               storage_name: str | None = None, mlflow_run_id: str | None = None, parent_run_id: str | None = None,
               replicas: list | None = None, replicas_version: int = 0, replica_nodes: list[str] | None = None,
               final_refresh: bool = False, cache_uri: str | None = None) -> dict:
    """Fit the generator on ``table`` (PreferencePair rows, e.g. ``pairs.writer.pairs_table``).

    ``init_uri``: a trained folder to start from (the previous round's transformer or adapter);
    ``resume_from``: a checkpoint URI of an interrupted run with the same config;
    ``cache_uri``: the latent cache (default ``<output_dir>/latent-cache``; ``align`` keeps one per round, pruned
    with its videos); ``storage_name``: the Ray Train run's folder under ``<output_dir>/ray-train`` (default: a new
    one); a run started again under the same name continues from that run's last checkpoint;
    ``mlflow_run_id``: continue that MLflow run (its logged updates are not logged again);
    ``replicas``: generator actors (on nodes ``replica_nodes``) to refresh every ``gapo.refresh_every`` updates
    (versions ``replicas_version + k``) and, with ``final_refresh``, with the written weights at the end (their
    version is ``live_weights_version`` in the result; else the caller refreshes them). Returns the last update's
    metrics, ``weights_uri`` (the folder the ranks wrote), ``weights_checksum``, ``checkpoint_uri``,
    ``checkpoints`` ({update: uri}) and ``mlflow_run_id``.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from anisora_ray.gapo.failures import RepeatedFailureError, RepeatedFailureStop
    from anisora_ray.io import fs
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.runtime import init_ray, train_settings
    from anisora_ray.storage_check import check_storage
    from anisora_ray.tracking import log_metrics, mlflow_run, tracking_uri
    from anisora_ray.weights.folder import read_manifest

    root = root or os.getcwd()
    g = cfg.gapo
    pair_rows(table)  # fail on the driver, naming missing columns
    if table.num_rows < g.num_workers * g.pairs_per_step:
        raise ValueError(f"{table.num_rows} pair(s): too few for {g.num_workers} worker(s) x {g.pairs_per_step} pair(s) per step")
    ds_config = deepspeed_config(cfg, root)
    output = fs.check_writable(fs.normalize(cfg.run.output_dir))
    out_uri = fs.check_writable(out_uri or fs.join(output, "gapo", "weights"), "the GAPO weights folder")
    init_ray(cfg.ray)
    check_storage(output)  # every worker reads and writes the same folder, before any model loads
    check_storage(out_uri, "the GAPO weights folder")  # at once when under run.output_dir
    name = storage_name or f"{run_name}-{os.getpid()}-{int(time.time())}"
    quarantine_uri = fs.join(output, "gapo-quarantine", name)  # pairs a worker could not read, per rank
    with mlflow_run(cfg, run_name, parent_run_id=parent_run_id, tags={"anisora.stage": "gapo"},
                    run_id=mlflow_run_id) as run:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(), "pretrained": resolve_pretrained(cfg.model, cfg.generator),
                               "deepspeed": ds_config, "init_uri": init_uri, "resume_from": resume_from,
                               "out_uri": out_uri, "quarantine_uri": quarantine_uri,
                               "refresh": {"actors": list(replicas), "nodes": replica_nodes, "base_version": replicas_version,
                                           "bucket_mb": g.refresh_bucket_mb, "final": final_refresh,
                                           "transport": cfg.loop.refresh_transport}
                               if replicas and (g.refresh_every or final_refresh) else None,
                               "cache_uri": cache_uri or fs.join(output, "latent-cache"),
                               "pairs": ray.put(table),  # held by this call until fit() returns
                               "mlflow": (tracking_uri(cfg), run.info.run_id)},
            scaling_config=ray.train.ScalingConfig(num_workers=g.num_workers, use_gpu=g.use_gpu, resources_per_worker=g.worker_request()),
            torch_config=TorchConfig(backend=None if g.backend == "auto" else g.backend),
            run_config=ray.train.RunConfig(name=name,
                                           storage_path=fs.join(output, "ray-train"),
                                           failure_config=ray.train.FailureConfig(max_failures=g.max_failures),
                                           callbacks=[RepeatedFailureStop(g.same_failure_limit)],
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=g.checkpoints_to_keep)),
        )
        with train_settings(cfg.ray):
            try:
                result = trainer.fit()
            except ray.train.ControllerError as exc:  # the stop above: its own error, not Ray Train's wrapper
                if isinstance(exc.controller_failure, RepeatedFailureError):
                    raise exc.controller_failure from None
                raise
        if result.error is not None or (result.checkpoint is None and g.final_checkpoint):
            raise RuntimeError(f"GAPO training failed: {result.error or 'no checkpoint was reported'}")
        final = result.return_value if isinstance(result.return_value, dict) else result.metrics  # the last update's
        manifest = read_manifest(out_uri)  # metadata only: the weights stay where the ranks wrote them
        if manifest is None or manifest.get("step") != g.steps:
            raise RuntimeError(f"GAPO training ended without writing the weights of update {g.steps} to {out_uri}")
        log_metrics({f"final_{k}": v for k, v in final.items()})
        checkpoints = {int(m["step"]): c.path for c, m in (result.best_checkpoints or []) if "step" in m}
        return {**final, "weights_uri": out_uri, "kind": manifest["kind"], "weights_checksum": manifest["checksum"],
                "quarantine_uri": quarantine_uri, "checkpoint_uri": result.checkpoint.path if result.checkpoint else "",
                "checkpoints": checkpoints, "mlflow_run_id": run.info.run_id}
