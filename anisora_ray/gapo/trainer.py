"""GAPO training of the generator's transformer with Ray Train + DeepSpeed (gloo on CPU, NCCL on GPU).

Each worker loads the image-to-video pipeline through the same ``from_pretrained`` path as the
replicas, keeps a frozen reference copy of the transformer, wraps the trained copy with
``deepspeed.initialize`` (ZeRO stage, optimizer, schedule, clipping and precision from the
DeepSpeed JSON named by ``gapo.deepspeed_config``) and streams its shard of the pairs parquet
(``get_dataset_shard``): videos are decoded, encoded to latents by the frozen VAE, and each step
evaluates :func:`anisora_ray.gapo.diffusion.gapo_step`. Rank 0 reports the trained transformer
as safetensors in the final checkpoint.

Still to come (issue 5): LoRA, checkpoint every N steps with resume, latent caching, MLflow metrics.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile

import numpy as np
import pyarrow as pa
import torch

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import ConfigError
from anisora_ray.gapo.diffusion import (
    PairLatents,
    encode_first_frames,
    encode_prompts,
    encode_videos,
    gapo_step,
    prediction_errors,
    rotary_embeddings,
)
from anisora_ray.gapo.loss import GapoLoss
from anisora_ray.io.images import load_image
from anisora_ray.io.video import read_all_frames


def deepspeed_config(cfg: AnisoraConfig, root: str) -> dict:
    path = cfg.gapo.deepspeed_config
    path = path if os.path.isabs(path) else os.path.join(root, path)
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"gapo.deepspeed_config = {cfg.gapo.deepspeed_config!r}: cannot read a JSON file at {path} ({exc})") from None
    ds["train_micro_batch_size_per_gpu"] = cfg.gapo.pairs_per_step
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch × accumulation × world
    return ds


def load_pairs_batch(pipe, rows: list[dict]) -> PairLatents:
    """Decode a batch of pair rows and encode them for the transformer."""
    winners = np.stack([read_all_frames(r["winner_video_uri"]) for r in rows])
    losers = np.stack([read_all_frames(r["loser_video_uri"]) for r in rows])
    images = np.stack([np.asarray(load_image(r["image_uri"]).resize(winners.shape[3:1:-1])) for r in rows])
    w = encode_videos(pipe, winners)
    return PairLatents(
        winner=w, loser=encode_videos(pipe, losers), image=encode_first_frames(pipe, images, w.shape[1]),
        prompt_embeds=encode_prompts(pipe, [r["prompt"] for r in rows]),
        reward_w=torch.tensor([float(r["winner_reward"]) for r in rows], device=w.device),
        reward_l=torch.tensor([float(r["loser_reward"]) for r in rows], device=w.device),
    )


def sft_loss(model, scheduler, batch: PairLatents, generator: torch.Generator, rotary) -> GapoLoss:
    """The paper's SFT baseline: the diffusion loss on the winners alone."""
    noise = torch.randn(batch.winner.shape, generator=generator, dtype=batch.winner.dtype).to(batch.winner.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch.winner.shape[0],), generator=generator).to(noise.device)
    err_w, _ = prediction_errors(model, scheduler, batch, noise, t, rotary)
    zero = torch.zeros_like(err_w)
    return GapoLoss(loss=err_w.mean(), dpo=err_w, gain=torch.ones_like(err_w), margin=zero)


def train_loop_per_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    from anisora_ray.models.pipeline import load_i2v_pipeline

    cfg = AnisoraConfig.model_validate(config["cfg"])
    g = cfg.gapo
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(g.seed)
    pipe = load_i2v_pipeline(config["pretrained"], cfg.model.dtype, str(device), cfg.model.revision)
    reference = pipe.transformer.eval().requires_grad_(False)
    model = copy.deepcopy(reference).train().requires_grad_(True)
    if g.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=config["deepspeed"])
    generator = torch.Generator().manual_seed(g.seed + 1000 * rank)
    shard = ray.train.get_dataset_shard("pairs")
    step, rotary = 0, None
    while step < g.steps:
        for rows in shard.iter_batches(batch_size=g.pairs_per_step, batch_format="pyarrow", drop_last=True):
            batch = load_pairs_batch(pipe, rows.to_pylist())
            if rotary is None:
                h, w = cfg.generator.height, cfg.generator.width
                rotary = rotary_embeddings(pipe, h, w, batch.winner.shape[1])
            if g.loss == "sft":
                out = sft_loss(engine, pipe.scheduler, batch, generator, rotary)
            else:
                out = gapo_step(engine, reference, pipe.scheduler, batch, generator, beta=g.beta, alpha=g.alpha,
                                use_gain=g.loss == "gapo", rotary=rotary)
            engine.backward(out.loss)
            engine.step()
            step += 1
            metrics = {"step": step, **out.metrics(), "lr": float(engine.get_lr()[0])}
            if step < g.steps:
                ray.train.report(metrics)
                continue
            checkpoint = None
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    engine.module.save_pretrained(tmp, safe_serialization=True, is_main_process=True)
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=checkpoint)
            break


def train_gapo(cfg: AnisoraConfig, table: pa.Table, out_uri: str | None = None, root: str | None = None) -> dict:
    """Fit the transformer on ``table`` (PreferencePair rows, e.g. ``pairs.writer.pairs_table``);
    returns the last step's metrics and the trained transformer's folder."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from anisora_ray.io import fs
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.runtime import init_ray

    root = root or os.getcwd()
    if table.num_rows < cfg.gapo.num_workers * cfg.gapo.pairs_per_step:
        raise ValueError(f"{table.num_rows} pair(s): too few for {cfg.gapo.num_workers} worker(s) "
                         f"x {cfg.gapo.pairs_per_step} pair(s) per step")
    init_ray(cfg.ray)
    output = fs.normalize(cfg.run.output_dir)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "pretrained": resolve_pretrained(cfg.model, cfg.generator),
                           "deepspeed": deepspeed_config(cfg, root)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.gapo.num_workers, use_gpu=cfg.gapo.use_gpu,
                                               resources_per_worker={"CPU": cfg.gapo.cpus_per_worker}),
        datasets={"pairs": ray.data.from_arrow(table)},
        run_config=ray.train.RunConfig(name=f"gapo-{os.getpid()}", storage_path=fs.join(output, "ray-train")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"GAPO training produced no checkpoint (error: {result.error})")
    out_uri = out_uri or fs.join(output, "gapo", "transformer")
    with result.checkpoint.as_directory() as ckpt:
        for name in os.listdir(ckpt):
            with open(os.path.join(ckpt, name), "rb") as f:
                fs.write_bytes(fs.join(out_uri, name), f.read())
    return {**result.metrics, "transformer_uri": out_uri}
