"""GAPO training of the generator's transformer with Ray Train + DeepSpeed (gloo on CPU, NCCL on GPU).

Each worker loads the image-to-video pipeline through the same ``from_pretrained`` path as the
replicas, builds the policy (the whole transformer, or a ``gapo`` LoRA adapter through peft) and
its frozen reference (a copy, or the same transformer with the adapter disabled), wraps the
policy with ``deepspeed.initialize`` (ZeRO stage, optimizer, schedule, clipping and precision from
the JSON named by ``gapo.deepspeed_config``) and trains on the pairs it receives through
``get_dataset_shard``. Every ``gapo.checkpoint_every`` steps and at the end all ranks report a
checkpoint (DeepSpeed state + step + publishable weights); a run given ``resume_from`` restores
model, optimizer, scheduler and step, and the data position follows from the step. Rank 0 logs
every step's metrics (averaged over workers) to MLflow.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time

import pyarrow as pa
import torch

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import ConfigError
from anisora_ray.gapo.batches import PairEncoder, pair_rows, step_rows, worker_rows
from anisora_ray.gapo.checkpoint import WEIGHTS_DIR, load_training_state, save_training_state, save_weights, weights_only_checkpoint_engine
from anisora_ray.gapo.diffusion import PairLatents, gapo_step, prediction_errors, rotary_embeddings
from anisora_ray.gapo.loss import GapoLoss
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.update import load_folder


def deepspeed_config(cfg: AnisoraConfig, root: str) -> dict:
    path = cfg.gapo.deepspeed_config
    if not os.path.isabs(path):  # relative to the working dir, else to the checkout the package runs from
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = next((os.path.join(r, path) for r in (root, package_root) if os.path.isfile(os.path.join(r, path))),
                    os.path.join(root, path))
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"gapo.deepspeed_config = {cfg.gapo.deepspeed_config!r}: cannot read a JSON file at {path} ({exc})") from None
    ds["train_micro_batch_size_per_gpu"] = cfg.gapo.pairs_per_step
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch × accumulation × world
    if cfg.gapo.learning_rate is not None:
        ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = cfg.gapo.learning_rate
        if "warmup_max_lr" in ds.get("scheduler", {}).get("params", {}):
            ds["scheduler"]["params"]["warmup_max_lr"] = cfg.gapo.learning_rate
    return ds


def sft_loss(model, scheduler, batch: PairLatents, generator: torch.Generator, rotary) -> GapoLoss:
    """The paper's SFT baseline: the diffusion loss on the winners alone."""
    noise = torch.randn(batch.winner.shape, generator=generator, device=batch.winner.device, dtype=batch.winner.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch.winner.shape[0],), generator=generator,
                      device=batch.winner.device)
    err_w, _ = prediction_errors(model, scheduler, batch, noise, t, rotary)
    zero = torch.zeros_like(err_w)
    return GapoLoss(loss=err_w.mean(), dpo=err_w, gain=torch.ones_like(err_w), margin=zero)


class AdapterOffReference:
    """The LoRA reference: the policy's own transformer with the ``gapo`` adapter disabled."""

    def __init__(self, transformer):
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def __call__(self, **kwargs):
        self.transformer.disable_adapters()
        try:
            return self.transformer(**kwargs)
        finally:
            self.transformer.enable_adapters()


def build_policy(pipe, cfg: AnisoraConfig, init_uri: str | None):
    """(policy, reference): the trained module and the frozen one it is compared against."""
    g = cfg.gapo
    base = pipe.transformer.eval().requires_grad_(False)
    if g.lora.r > 0:
        lora_io.add_adapter(base, g.lora)
        if init_uri:
            load_folder(base, init_uri)
        for name, param in base.named_parameters():
            param.requires_grad_(f".{lora_io.ADAPTER}." in name)
        policy, reference = base, AdapterOffReference(base)
    else:
        if init_uri:
            load_folder(base, init_uri)
        policy, reference = copy.deepcopy(base).requires_grad_(True), base
    if g.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy, reference


def step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + step) % 2**63


class StepLogger:
    """Rank 0's per-step MLflow metrics (the driver opened the run)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def mean_over_workers(metrics: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist(), strict=True))


def _report(engine, metrics: dict, step: int, lora) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        save_training_state(engine, folder, step, lora is not None)
        save_weights(engine, os.path.join(folder, WEIGHTS_DIR), lora)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _refresh_replicas(engine, refresh: dict, version: int, lora, step: int) -> None:
    """Mid-training refresh (``gapo.refresh_every``): rank 0 publishes the current weights to the replicas."""
    import logging

    from anisora_ray.weights.refresh import publish, refresh_actors

    with tempfile.TemporaryDirectory() as folder:
        save_weights(engine, folder, lora)  # a collective under ZeRO-3: every rank takes part
        if engine.global_rank == 0:
            reports = refresh_actors(refresh["actors"], publish(folder, version, refresh["bucket_mb"]))
            logging.getLogger(__name__).info("step %d: %d replica(s) at weights version %d", step, len(reports), version)


def _load_rows(rank: int, world: int) -> list[dict]:
    import ray.train

    shard = ray.train.get_dataset_shard("pairs")  # unsplit: every worker sees all pairs, keeps its own
    table = pa.concat_tables(list(shard.iter_batches(batch_size=None, batch_format="pyarrow")))
    return worker_rows(pair_rows(table), rank, world)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    from anisora_ray.models.pipeline import load_i2v_pipeline

    cfg = AnisoraConfig.model_validate(config["cfg"])
    g = cfg.gapo
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(g.seed)
    pipe = load_i2v_pipeline(config["pretrained"], cfg.model.dtype, str(device), cfg.model.revision)
    policy, reference = build_policy(pipe, cfg, config.get("init_uri"))
    engine, _, _, _ = deepspeed.initialize(model=policy, model_parameters=[p for p in policy.parameters() if p.requires_grad],
                                           config=config["deepspeed"])
    weights_only_checkpoint_engine(engine)
    lora = g.lora if g.lora.r > 0 else None
    start = 0
    checkpoint = ray.train.get_checkpoint()  # Ray Train's own restore after a worker failure
    if checkpoint is None and config.get("resume_from"):
        checkpoint = ray.train.Checkpoint(config["resume_from"])
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = load_training_state(engine, folder, lora is not None)
    rows = _load_rows(rank, world)
    encoder = PairEncoder(pipe, config["pretrained"], cfg.generator.height, cfg.generator.width,
                          config["cache_uri"] if g.cache_latents else None)
    logger = StepLogger(*config["mlflow"]) if rank == 0 and config.get("mlflow") else None
    rotary = None
    for step in range(start, g.steps):
        began = time.perf_counter()
        batch = encoder.batch(step_rows(rows, step, g.pairs_per_step, g.seed + 7919 * rank))
        if rotary is None:
            rotary = rotary_embeddings(pipe, cfg.generator.height, cfg.generator.width, batch.winner.shape[1])
        generator = torch.Generator(device=batch.winner.device).manual_seed(step_seed(g.seed, rank, step))
        if g.loss == "sft":
            out = sft_loss(engine, pipe.scheduler, batch, generator, rotary)
        else:
            out = gapo_step(engine, reference, pipe.scheduler, batch, generator, beta=g.beta, alpha=g.alpha,
                            use_gain=g.loss == "gapo", rotary=rotary)
        engine.backward(out.loss)
        engine.step()
        grad_norm = engine.get_global_grad_norm()
        local = {**out.metrics(), "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                 "step_seconds": time.perf_counter() - began}
        metrics = {**mean_over_workers(local, device), "lr": float(engine.get_lr()[0]), "step": step + 1,
                   "latent_cache_hits": encoder.hits, "latent_cache_misses": encoder.misses}
        refresh = config.get("refresh")
        if refresh and g.refresh_every and (step + 1) % g.refresh_every == 0 and step + 1 < g.steps:
            version = refresh["base_version"] + (step + 1) // g.refresh_every
            _refresh_replicas(engine, refresh, version, lora, step + 1)
            metrics["weights_version"] = version
        if logger:
            logger.log(metrics, step + 1)
        if step + 1 == g.steps or (g.checkpoint_every and (step + 1) % g.checkpoint_every == 0):
            _report(engine, metrics, step + 1, lora)


def train_gapo(cfg: AnisoraConfig, table: pa.Table, out_uri: str | None = None, root: str | None = None, *,
               init_uri: str | None = None, resume_from: str | None = None, run_name: str = "gapo",
               parent_run_id: str | None = None, replicas: list | None = None, replicas_version: int = 0) -> dict:
    """Fit the generator on ``table`` (PreferencePair rows, e.g. ``pairs.writer.pairs_table``).

    ``init_uri``: a trained folder to start from (the previous round's transformer or adapter);
    ``resume_from``: a checkpoint URI of an interrupted run with the same config; ``replicas``:
    generator actors to refresh every ``gapo.refresh_every`` steps (versions ``replicas_version + k``;
    the caller refreshes the final weights). Returns the last
    step's metrics, ``weights_uri`` (what a refresh publishes), ``checkpoint_uri``,
    ``checkpoints`` ({step: uri}) and ``mlflow_run_id``.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from anisora_ray.io import fs
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.runtime import init_ray
    from anisora_ray.tracking import log_metrics, mlflow_run, tracking_uri

    root = root or os.getcwd()
    g = cfg.gapo
    pair_rows(table)  # fail on the driver, naming missing columns
    if table.num_rows < g.num_workers * g.pairs_per_step:
        raise ValueError(f"{table.num_rows} pair(s): too few for {g.num_workers} worker(s) x {g.pairs_per_step} pair(s) per step")
    ds_config = deepspeed_config(cfg, root)
    init_ray(cfg.ray)
    output = fs.normalize(cfg.run.output_dir)
    with mlflow_run(cfg, run_name, parent_run_id=parent_run_id, tags={"anisora.stage": "gapo"}) as run:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"cfg": cfg.model_dump(), "pretrained": resolve_pretrained(cfg.model, cfg.generator),
                               "deepspeed": ds_config, "init_uri": init_uri, "resume_from": resume_from,
                               "refresh": {"actors": list(replicas), "base_version": replicas_version,
                                           "bucket_mb": g.refresh_bucket_mb} if replicas and g.refresh_every else None,
                               "cache_uri": fs.join(output, "latent-cache"),
                               "mlflow": (tracking_uri(cfg), run.info.run_id)},
            scaling_config=ray.train.ScalingConfig(num_workers=g.num_workers, use_gpu=g.use_gpu,
                                                   resources_per_worker={"CPU": g.cpus_per_worker}),
            datasets={"pairs": ray.data.from_arrow(table)},
            dataset_config=ray.train.DataConfig(datasets_to_split=[]),
            run_config=ray.train.RunConfig(name=f"{run_name}-{os.getpid()}-{int(time.time())}",
                                           storage_path=fs.join(output, "ray-train"),
                                           checkpoint_config=ray.train.CheckpointConfig(num_to_keep=g.checkpoints_to_keep)),
        )
        result = trainer.fit()
        if result.error is not None or result.checkpoint is None:
            raise RuntimeError(f"GAPO training failed: {result.error or 'no checkpoint was reported'}")
        out_uri = out_uri or fs.join(output, "gapo", "weights")
        with result.checkpoint.as_directory() as folder:
            weights = os.path.join(folder, WEIGHTS_DIR)
            for name in sorted(os.listdir(weights)):
                with open(os.path.join(weights, name), "rb") as f:
                    fs.write_bytes(fs.join(out_uri, name), f.read())
        log_metrics({f"final_{k}": v for k, v in result.metrics.items()})
        checkpoints = {int(m["step"]): c.path for c, m in (result.best_checkpoints or [])}
        return {**result.metrics, "weights_uri": out_uri, "kind": "lora" if g.lora.r > 0 else "full",
                "checkpoint_uri": result.checkpoint.path, "checkpoints": checkpoints, "mlflow_run_id": run.info.run_id}
