"""``anisora-ray train-reward``: fit one dimension's regression head on human ratings with Ray Train.

The annotated parquet has ``video_uri``, ``prompt``, ``image_uri`` and one label column per
dimension (the paper's ratings are 1–5). A deterministic split by video URI holds out
``holdout_fraction`` of the clips. Each Ray Train worker decodes its shard once; with a frozen
backbone the head's input tokens are computed once too, otherwise (LoRA through peft) every step.
Gradients are averaged across workers. Rank 0 evaluates on the held-out split (PLCC, SRCC,
pairwise accuracy) and checkpoints the head (safetensors + json) and the adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import ConfigError, ManifestError
from anisora_ray.io import fs
from anisora_ray.models.tiny_reward import resolve_backbones
from anisora_ray.reward.base import ClipBatch, build_dimension, trains_a_head
from anisora_ray.reward.encoders import RegressionHead
from anisora_ray.types import QuarantineRecord

log = logging.getLogger(__name__)
REQUIRED_COLUMNS = ("video_uri", "prompt", "image_uri")


def load_annotations(uri: str, label: str) -> tuple[pa.Table, list[QuarantineRecord]]:
    """The annotated clips with a finite ``label``; rows without one are quarantined, not dropped silently."""
    table = fs.read_table(uri)
    missing = [c for c in (*REQUIRED_COLUMNS, label) if c not in table.column_names]
    if missing:
        raise ManifestError(f"annotations {uri!r}: missing column(s) {missing}; found {table.column_names}")
    values = table.column(label).cast(pa.float64()).to_numpy(zero_copy_only=False)
    ok = np.isfinite(values)
    bad = [QuarantineRecord("train-reward", str(u), "invalid label", uri=str(u), detail=f"{label} = {v}")
           for u, v, good in zip(table.column("video_uri").to_pylist(), values, ok, strict=True) if not good]
    table = table.filter(pa.array(ok)).select(list(REQUIRED_COLUMNS)).append_column("label", pa.array(values[ok]))
    if table.num_rows < 4:
        raise ManifestError(f"annotations {uri!r}: only {table.num_rows} clip(s) with a finite {label!r} label; "
                            "need at least 4")
    return table, bad


def split_holdout(table: pa.Table, fraction: float, seed: int, base: str = "") -> tuple[pa.Table, pa.Table]:
    """Deterministic split by a hash of the video URI relative to ``base`` (the annotations' folder):
    stable when rows are added or reordered and when the data set is moved as a whole."""
    prefix = base.rstrip("/") + "/" if base else ""
    u = [int(hashlib.sha256(f"{seed}:{v.removeprefix(prefix)}".encode()).hexdigest()[:8], 16) / 2**32
         for v in table.column("video_uri").to_pylist()]
    held = pa.array(np.asarray(u) < fraction)
    train, holdout = table.filter(pc.invert(held)), table.filter(held)
    if holdout.num_rows == 0 or train.num_rows == 0:
        raise ManifestError(f"annotations: holdout_fraction={fraction} leaves an empty split ({table.num_rows} clips)")
    return train, holdout


def ranking_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """PLCC, SRCC, pairwise accuracy (pairs with different labels ordered alike) and MSE."""
    from scipy.stats import pearsonr, spearmanr

    pred, label = np.asarray(pred, float), np.asarray(label, float)
    i, j = np.triu_indices(len(label), k=1)
    differ = label[i] != label[j]
    agree = np.sign(pred[i] - pred[j]) == np.sign(label[i] - label[j])
    constant = np.ptp(pred) == 0 or np.ptp(label) == 0
    return {
        "plcc": float("nan") if constant else float(pearsonr(pred, label)[0]),
        "srcc": float("nan") if constant else float(spearmanr(pred, label)[0]),
        "pairwise_accuracy": float(agree[differ].mean()) if differ.any() else float("nan"),
        "mse": float(np.mean((pred - label) ** 2)),
    }


def _decode_shard(cfg: AnisoraConfig, shard, batch_size: int, rank: int = 0, world: int = 1,
                  ) -> tuple[list[tuple[ClipBatch, np.ndarray]], list[QuarantineRecord]]:
    """This worker's rows (``row % world == rank``: the same rows on every run), decoded in batches; a clip or
    image that cannot be decoded is quarantined with its reason."""
    from anisora_ray.reward.stage import decode_batch

    mine = [r for rows in shard.iter_batches(batch_format="pyarrow") for r in rows.to_pylist() if r["row"] % world == rank]
    out, bad = [], []
    for start in range(0, len(mine), batch_size):
        items = [SimpleNamespace(**{"character_id": None, **r}) for r in mine[start : start + batch_size]]
        kept, batch, failed = decode_batch(cfg, items)
        for uri, reason in failed.items():
            log.warning("train-reward: quarantined %s: %s", uri, reason)
            bad.append(QuarantineRecord("train-reward", uri, "undecodable clip", uri=uri, detail=reason[:2000]))
        labels = np.array([k.label for k in kept], dtype=np.float32)
        for indices in batch.sizes().values() if kept else ():  # a backbone stacks frames: one size a batch
            out.append((batch.take(indices), labels[indices]))
    return out, bad


def _pad(tokens: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(t.shape[0] for t in tokens)
    x = torch.zeros(len(tokens), k, tokens[0].shape[-1], device=tokens[0].device)
    mask = torch.zeros(len(tokens), k, device=tokens[0].device)
    for i, t in enumerate(tokens):
        x[i, : len(t)], mask[i, : len(t)] = t, 1
    return x, mask


def _all_reduce(values: list[float], op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: decode, featurize, fit the head (and LoRA), evaluate and checkpoint on rank 0."""
    import ray.train
    import torch.distributed as dist

    cfg = AnisoraConfig.model_validate(config["cfg"])
    t = cfg.reward.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    dim_cfg = cfg.reward.dimensions.as_dict()[t.dimension]
    options = {**config["options"], "head": None, "training": True, "device": str(device)}
    torch.manual_seed(t.seed)
    dimension = build_dimension(t.dimension, dim_cfg.backend, **options)
    trainable: list[torch.nn.Parameter] = []
    if t.lora.r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout, target_modules=t.lora.target_modules)
        dimension.backbone.model = get_peft_model(dimension.backbone.model, lora)
        trainable += [p for p in dimension.backbone.model.parameters() if p.requires_grad]

    def featurize(batch: ClipBatch) -> list[torch.Tensor]:
        with torch.set_grad_enabled(bool(t.lora.r)):
            return dimension.tokens(batch)

    train, bad = _decode_shard(cfg, ray.train.get_dataset_shard("train"), t.batch_size, rank, world)
    holdout, bad_holdout = _decode_shard(cfg, ray.train.get_dataset_shard("holdout"), t.batch_size) if rank == 0 else ([], [])
    if bad or bad_holdout:  # nothing set aside is lost: the driver counts these
        fs.write_table(QuarantineRecord.to_table(bad + bad_holdout), fs.join(config["quarantine_uri"], f"rank-{rank}.parquet"))
    if not train:
        raise ValueError(f"train-reward rank {rank}: none of its training clips could be decoded ({len(bad)} "
                         f"quarantined: {'; '.join(f'{q.uri}: {q.detail[:120]}' for q in bad[:3])})")
    cached = None if t.lora.r else [(featurize(b), torch.from_numpy(y)) for b, y in train]
    labels = np.concatenate([y for _, y in train]) if train else np.zeros(0, np.float32)
    n, s1, s2 = _all_reduce([len(labels), float(labels.sum()), float((labels.astype(np.float64) ** 2).sum())])
    mean = s1 / max(n, 1)
    std = math.sqrt(max(s2 / max(n, 1) - mean**2, 1e-12))
    probe = cached[0][0] if cached else featurize(train[0][0])
    head = RegressionHead(probe[0].shape[-1], t.hidden, output=dimension.head_output, label_mean=mean, label_std=std,
                          meta={"dimension": t.dimension, "backbone": dim_cfg.options.get("backbone"), "lora": t.lora.r > 0})
    head.to(device)
    trainable += list(head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    steps = int(_all_reduce([len(train)], op="max")[0])  # equal step counts keep the all-reduces in lockstep
    rng = np.random.default_rng(t.seed + rank)
    history = []
    for epoch in range(t.epochs):
        order = rng.permutation(max(len(train), 1))
        total = 0.0
        for step in range(steps):
            i = int(order[step % len(order)])
            tokens, y = cached[i] if cached else (featurize(train[i][0]), torch.from_numpy(train[i][1]))
            x, mask = _pad(tokens)
            loss = torch.nn.functional.mse_loss(head(x, mask, standardized=True), ((y - mean) / std).to(device))
            optimizer.zero_grad()
            loss.backward()
            if world > 1:
                for p in trainable:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            optimizer.step()
            total += float(loss)
        metrics = {"epoch": epoch, "train_loss": total / max(steps, 1)}
        last = epoch == t.epochs - 1
        if not (last or (epoch + 1) % max(1, t.epochs // 10) == 0):
            continue  # each report costs a round trip to the controller: ~10 per run
        if rank == 0:
            metrics.update({f"holdout_{k}": v for k, v in _evaluate(head, featurize, holdout).items()})
        history.append(metrics)
        if not last or rank != 0:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            head.cpu().save(tmp)
            if t.lora.r:
                dimension.backbone.model.save_pretrained(os.path.join(tmp, "adapter"))
            with open(os.path.join(tmp, "history.json"), "w") as f:
                json.dump(history, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


@torch.no_grad()
def _evaluate(head: RegressionHead, featurize, holdout) -> dict[str, float]:
    preds, labels = [], []
    head.eval()
    for batch, y in holdout:
        x, mask = _pad(featurize(batch))
        preds.append(head(x, mask).cpu().numpy())
        labels.append(y)
    head.train()
    return ranking_metrics(np.concatenate(preds), np.concatenate(labels)) if preds else {}


def _listing(uri: str) -> list[str]:
    filesystem, root = fs.url_to_fs(uri)
    return sorted(p.rsplit("/", 1)[-1] for p in filesystem.ls(root, detail=False)) if filesystem.exists(root) else []


def train_reward(cfg: AnisoraConfig, annotations_uri: str, out_uri: str | None = None) -> dict:
    """What ``anisora-ray train-reward`` does: split, fit with Ray Train, save the head, log to MLflow."""
    import mlflow
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from anisora_ray.runtime import init_ray, train_settings
    from anisora_ray.tracking import log_metrics, mlflow_run

    t = cfg.reward.training
    backend = cfg.reward.dimensions.as_dict()[t.dimension].backend
    if not trains_a_head(t.dimension, backend):  # it failed inside Ray Train, after the workers started
        raise ConfigError(f"train-reward trains a head on a learned backbone; reward.dimensions.{t.dimension}.backend = "
                          f"{backend!r} has none: --set reward.dimensions.{t.dimension}.backend=siglip (or another "
                          "learned backend: README, \"AnimeReward backends\")")
    label = t.label_column or t.dimension
    table, bad = load_annotations(annotations_uri, label)
    train, holdout = split_holdout(table, t.holdout_fraction, t.seed, base=fs.normalize(annotations_uri).rsplit("/", 1)[0])
    train = train.append_column("row", pa.array(np.arange(train.num_rows)))
    holdout = holdout.append_column("row", pa.array(np.arange(holdout.num_rows)))
    out_uri = out_uri or fs.join(fs.normalize(cfg.run.output_dir), "reward-heads", t.dimension)
    quarantine_uri = fs.join(out_uri, "quarantine")  # labels.parquet (here), rank-<r>.parquet (clips, the workers)
    if fs.exists(quarantine_uri):
        fs.remove(quarantine_uri)  # this run's only
    if bad:
        fs.write_table(QuarantineRecord.to_table(bad), fs.join(quarantine_uri, "labels.parquet"))
    init_ray(cfg.ray)
    storage = fs.join(fs.normalize(cfg.run.output_dir), "ray-train")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "quarantine_uri": quarantine_uri,
                           "options": resolve_backbones(cfg.reward.dimensions.as_dict()[t.dimension].options)},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker={"CPU": t.cpus_per_worker}),
        datasets={"train": ray.data.from_arrow(train), "holdout": ray.data.from_arrow(holdout)},
        # Not split by Ray Data (its streaming split hands blocks to whichever worker asks first):
        # each worker keeps the rows with row % world == rank, so a run is reproducible.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
        run_config=ray.train.RunConfig(name=f"train-reward-{t.dimension}-{os.getpid()}", storage_path=storage),
    )
    with train_settings(cfg.ray):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"train-reward for {t.dimension} produced no checkpoint (error: {result.error})")
    with result.checkpoint.as_directory() as ckpt:
        with open(os.path.join(ckpt, "history.json")) as f:
            history = json.load(f)
        filesystem, _ = fs.url_to_fs(out_uri)
        for root, _, files in os.walk(ckpt):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), ckpt)
                with open(os.path.join(root, name), "rb") as f:
                    fs.write_bytes(fs.join(out_uri, *rel.split(os.sep)), f.read())
    final = {k: v for k, v in history[-1].items() if k.startswith("holdout_")}
    clips = [fs.join(quarantine_uri, n) for n in (_listing(quarantine_uri)) if n.startswith("rank-")]
    summary = {"dimension": t.dimension, "label": label, "train_clips": train.num_rows, "holdout_clips": holdout.num_rows,
               "quarantined_labels": len(bad), "quarantined_clips": sum(fs.read_table(u).num_rows for u in clips),
               "quarantine_uri": quarantine_uri, "head_uri": out_uri, **final}
    fs.write_bytes(fs.join(out_uri, "metrics.json"), json.dumps(summary, indent=2).encode())
    with mlflow_run(cfg, f"train-reward-{t.dimension}", tags={"anisora.kind": "train-reward"}) as run:
        for row in history:
            log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        log_metrics({k: v for k, v in summary.items() if k.startswith("holdout_") or k.endswith("clips")})
        mlflow.log_dict(summary, "train_reward_summary.json")
        if not fs.is_url(out_uri):
            mlflow.log_artifacts(out_uri, artifact_path="head")
        summary["mlflow_run_id"] = run.info.run_id
    return summary
