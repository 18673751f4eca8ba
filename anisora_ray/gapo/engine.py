"""One GAPO worker without Ray: the DeepSpeed engine, optimizer updates, checkpoints and weight export.

:func:`anisora_ray.gapo.trainer.train_gapo` runs one :class:`GapoWorker` per Ray Train worker;
``benchmarks/realsize_gpu.py`` runs one in a plain process (NCCL, world size 1). A step of
``gapo.steps`` is one **optimizer update**: ``gradient_accumulation_steps`` micro-batches (from
the DeepSpeed JSON) of ``gapo.pairs_per_step`` pairs each. Micro-batch *m* of update *u* is the
worker's batch number ``u × accumulation + m``, with noise seeded by the same number, so the data
and noise of a resumed run follow from the update it resumes at.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time

import numpy as np
import torch

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import ConfigError
from anisora_ray.gapo.batches import PairEncoder, step_rows, usable_rows
from anisora_ray.gapo.checkpoint import load_training_state, save_training_state, weights_only_checkpoint_engine
from anisora_ray.gapo.diffusion import gapo_step, sft_step
from anisora_ray.gapo.export import export_and_stream, export_weights, stream_live
from anisora_ray.gapo.loss import GapoLoss
from anisora_ray.gapo.models import Encoders, build_policy, build_reference, load_transformer_pipeline, zero_stage
from anisora_ray.models.compile import compile_blocks
from anisora_ray.models.families import get_family

log = logging.getLogger(__name__)


def _merge(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: AnisoraConfig, root: str) -> dict:
    """The JSON named by ``gapo.deepspeed_config`` with ``gapo.deepspeed_overrides`` laid over it."""
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
    ds = _merge(ds, _checked_overrides(cfg.gapo))
    if cfg.gapo.compile and zero_stage(ds) == 3:
        raise ConfigError(f"gapo.compile needs ZeRO-1/2, {path} is ZeRO-3: it gathers parameters in module hooks that "
                          "the compiled blocks cannot hold; set gapo.compile=false or use a zero2 JSON")
    ds["train_micro_batch_size_per_gpu"] = cfg.gapo.pairs_per_step
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch × accumulation × world
    if cfg.gapo.learning_rate is not None:
        ds.setdefault("optimizer", {}).setdefault("params", {})["lr"] = cfg.gapo.learning_rate
        if "warmup_max_lr" in ds.get("scheduler", {}).get("params", {}):
            ds["scheduler"]["params"]["warmup_max_lr"] = cfg.gapo.learning_rate
    lr, peak = ds.get("optimizer", {}).get("params", {}).get("lr"), ds.get("scheduler", {}).get("params", {}).get("warmup_max_lr")
    if lr is not None and peak is not None and lr != peak:  # the scheduler sets the rate: the optimizer's lr is unused
        raise ConfigError(f"the DeepSpeed config's optimizer lr ({lr}) is not its scheduler's warmup_max_lr ({peak}), "
                          "which is the rate training runs at: set gapo.learning_rate (it sets both)")
    still = still_updates(ds, cfg.gapo.steps)
    if still:  # said: `train --set gapo.steps=2` wrote the base weights back without a word
        log.log(logging.WARNING if still >= cfg.gapo.steps else logging.INFO,
                "the DeepSpeed scheduler of %s (%s %s) steps the first %d of a fit's %d update(s) at learning rate 0%s",
                path, ds["scheduler"]["type"], ds["scheduler"].get("params", {}), still, cfg.gapo.steps,
                ": this fit will not change the weights (raise gapo.steps, or the scheduler's warmup_min_lr through "
                "gapo.deepspeed_overrides)" if still >= cfg.gapo.steps else "")
    return ds


def still_updates(ds: dict, steps: int) -> int:
    """How many of a fit's first ``steps`` updates DeepSpeed's scheduler runs at learning rate 0 (a WarmupLR from
    ``warmup_min_lr`` 0: the first two, whatever ``warmup_num_steps``), by stepping DeepSpeed's own scheduler class
    on a one-parameter optimizer."""
    scheduler = ds.get("scheduler") or {}
    try:
        from deepspeed.runtime import lr_schedules
    except Exception:  # noqa: BLE001 - a driver without DeepSpeed (or its accelerator): the workers' engine says it
        return 0
    kind = getattr(lr_schedules, str(scheduler.get("type")), None)
    if not isinstance(kind, type):
        return 0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    quiet = logging.getLogger("DeepSpeed")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Attempting to get learning rate from scheduler before it has started"
    try:
        schedule = kind(optimizer, **scheduler.get("params", {}))
        count = 0
        while count < steps and optimizer.param_groups[0]["lr"] == 0:
            count += 1
            schedule.step()
    except (TypeError, ValueError):  # parameters DeepSpeed refuses: its engine says so in the workers
        return 0
    finally:
        quiet.setLevel(level)
    return count


def _checked_overrides(g) -> dict:
    """``gapo.deepspeed_overrides``, refused where a gapo key sets the same thing (the override was overwritten)."""
    over = g.deepspeed_overrides
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size"):
        if key in over:
            raise ConfigError(f"gapo.deepspeed_overrides.{key}: gapo.pairs_per_step sets the micro batch (DeepSpeed derives "
                              "train_batch_size from it x gradient_accumulation_steps x workers); set that instead")
    lr_set = "lr" in over.get("optimizer", {}).get("params", {}) or "warmup_max_lr" in over.get("scheduler", {}).get("params", {})
    if lr_set and g.learning_rate is not None:
        raise ConfigError(f"gapo.deepspeed_overrides sets a learning rate that gapo.learning_rate ({g.learning_rate}) "
                          "replaces: set gapo.learning_rate only")
    return over


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of this rank's noise in micro-batch ``step``."""
    return (seed * 1_000_003 + rank * 10_007 + step) % 2**63


def shared_seed(seed: int, step: int) -> int:
    """The seed of micro-batch ``step``'s draws that every rank makes alike (Wan-A14B's expert): a stream of its
    own, so it is independent of each rank's noise (rank 0's included)."""
    return int(np.random.SeedSequence([seed, step, 0x5EED]).generate_state(1, np.uint64)[0]) % 2**63


def expert_groups(policy: torch.nn.Module) -> list[dict] | None:
    """Wan2.2-A14B's trained parameters as one optimizer group per expert (``transformer.*``, ``transformer_2.*``);
    None for a single transformer."""
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    second = [p for n, p in named if n.startswith("transformer_2.")]
    if not second:
        return None
    return [{"params": [p for n, p in named if not n.startswith("transformer_2.")]}, {"params": second}]


def mean_over_workers(metrics: dict[str, float], device) -> dict[str, float]:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist(), strict=True))


def latent_namespace(cfg: AnisoraConfig, pretrained: str) -> str:
    """What the latent cache's keys share besides each input's content: the encoders' identity (family, checkpoint,
    revision, dtype) and what changes their output (the geometry, VAE tiling: tiles blend; slicing)."""
    m, g = cfg.model, cfg.generator
    return (f"{m.family}|{pretrained}|{m.revision or ''}|{m.dtype}|{g.height}x{g.width}"
            f"|tiling={int(g.vae_tiling)}|slicing={int(g.vae_slicing)}")


class GapoWorker:
    """Policy engine, frozen reference and pair encoder of one rank (``torch.distributed`` initialised)."""

    def __init__(self, cfg: AnisoraConfig, pretrained: str, ds_config: dict, device: torch.device, *, rank: int = 0,
                 init_uri: str | None = None, cache_uri: str | None = None):
        import deepspeed

        self.cfg, self.device, self.rank = cfg, torch.device(device), rank
        g = cfg.gapo
        self.lora = g.lora if g.lora.r > 0 else None
        self.family = get_family(cfg.model.family)
        self.pipe = load_transformer_pipeline(pretrained, cfg, "cpu" if zero_stage(ds_config) == 3 else device)
        # gapo.timesteps=rollout: pairs are noised only at the timesteps the replicas sample at
        self.timesteps = (self.family.rollout_timesteps(self.pipe, cfg.generator.num_inference_steps)
                          if g.timesteps == "rollout" else None)
        policy = build_policy(self.family.trained_module(self.pipe), cfg, init_uri)
        if g.compile:
            compile_blocks(policy, eager_rounding=True)
        groups = expert_groups(policy)  # two experts: one optimizer group each (an idle one is not stepped)
        self.expert_groups = groups is not None
        self.engine, *_ = deepspeed.initialize(model=policy, config=ds_config, model_parameters=groups or
                                               [p for p in policy.parameters() if p.requires_grad])
        weights_only_checkpoint_engine(self.engine)
        self.reference = build_reference(self.engine, pretrained, cfg, ds_config, init_uri, self.device)
        if g.compile and self.lora is None and g.reference == "copy":
            compile_blocks(self.reference.module, eager_rounding=True)
        self.encoders = Encoders(pretrained, cfg, self.device)
        self.encoder = PairEncoder(self.encoders, self.family, latent_namespace(cfg, pretrained),
                                   cfg.generator.height, cfg.generator.width, cfg.generator.num_frames,
                                   self.family.text_length(self.pipe, cfg.generator), cache_uri, self.device,
                                   cfg.generator.prompt_suffix)
        self.rows: list[dict] = []
        self.quarantined: list = []  # QuarantineRecords of pairs dropped for bad content
        self.update = 0  # optimizer updates done
        self.last_lr = float("nan")  # the learning rate the last update stepped at
        self.resumed_from = 0  # the update this attempt restored (0: started fresh)

    @property
    def accumulation(self) -> int:
        return int(self.engine.gradient_accumulation_steps())

    @property
    def row_seed(self) -> int:
        """This rank's shuffle of its rows (``step_rows``)."""
        return self.cfg.gapo.seed + 7919 * self.rank

    def batch_rows(self, index: int) -> list[dict]:
        return step_rows(self.rows, index, self.cfg.gapo.pairs_per_step, self.row_seed)

    def prepare(self, rows: list[dict], on_progress=None) -> float:
        """Take this rank's rows and encode the ones the updates use (from the first: a resumed run quarantines what
        the uninterrupted one did, so its batches are the same); the VAE and text encoder are loaded only for
        latents missing from the cache and released afterwards."""
        began = time.perf_counter()
        g = self.cfg.gapo
        self.rows, bad = usable_rows(rows, g.steps * self.accumulation, g.pairs_per_step, self.row_seed,
                                     lambda needed: self.encoder.prefetch(needed, on_progress))
        self.quarantined += bad
        self.encoders.release()
        return time.perf_counter() - began

    def load(self, folder: str) -> int:
        self.update = self.resumed_from = load_training_state(self.engine, folder, self.lora is not None)
        return self.update

    def save(self, folder: str, metrics: dict | None = None) -> None:
        save_training_state(self.engine, folder, self.update, self.lora is not None, metrics)

    def _micro_step(self, index: int) -> GapoLoss:
        g = self.cfg.gapo
        rows = self.batch_rows(index)
        batch = self.encoder.batch(rows)
        generator = torch.Generator(device=batch.winner.device).manual_seed(step_seed(g.seed, self.rank, index))
        shared = torch.Generator(device=batch.winner.device).manual_seed(shared_seed(g.seed, index))  # alike on all ranks
        if g.loss == "sft":
            out = sft_step(self.family, self.pipe, self.engine, batch, generator, shared, self.timesteps)
        else:
            out = gapo_step(self.family, self.pipe, self.engine, self.reference, batch, generator, shared=shared,
                            beta=g.beta, alpha=g.alpha, use_gain=g.loss == "gapo", timesteps=self.timesteps)
        if not torch.isfinite(out.loss.detach()).all():  # before its gradients reach the weights (or Adam's moments)
            raise FloatingPointError(f"update {self.update + 1}, micro-batch {index}: loss {float(out.loss)} is not "
                                     f"finite (pairs {[r.get('prompt_id') or r['winner_video_uri'] for r in rows]}); the training diverged "
                                     "(lower the learning rate or gapo.beta) or a model error overflowed")
        self.engine.backward(out.loss)
        return out

    @contextlib.contextmanager
    def _idle_experts_still(self, trained: set[int]):
        """An expert no micro-batch of this update trained gets learning rate 0 for its step, so AdamW's momentum
        and weight decay do not move it (its gradients are zeros, not None, in DeepSpeed's flat groups); every rank
        drew the same experts. After the step the scheduler sets every group's rate; without one it is put back."""
        groups = self.engine.optimizer.param_groups if self.expert_groups else []
        idle = {i: groups[i]["lr"] for i in range(len(groups)) if i not in trained}
        for i in idle:
            groups[i]["lr"] = 0.0
        try:
            yield
        finally:
            for i, lr in idle.items():
                if groups[i]["lr"] == 0.0:  # no scheduler (or it skipped the step): the rate it had
                    groups[i]["lr"] = lr

    def train_update(self) -> dict[str, float]:
        """One optimizer update (all its micro-batches); this rank's metrics, averaged over micro-batches."""
        began, before = time.perf_counter(), self.engine.global_steps
        parts, trained = [], set()
        for m in range(self.accumulation):
            out = self._micro_step(self.update * self.accumulation + m)
            trained.add(out.expert)
            parts.append(out.metrics())
            if m == self.accumulation - 1:  # the rate this update steps at (the scheduler moves it after the step)
                self.last_lr = float(self.engine.get_lr()[0])
            with self._idle_experts_still(trained) if m == self.accumulation - 1 else contextlib.nullcontext():
                self.engine.step()  # the optimizer steps at the last micro-batch only
        if self.engine.global_steps != before + 1:  # DeepSpeed counts micro-steps itself
            raise RuntimeError(f"{self.accumulation} micro-batches made {self.engine.global_steps - before} optimizer "
                               "steps, expected 1 (gradient accumulation out of sync)")
        self.update += 1
        grad_norm = self.engine.get_global_grad_norm()
        metrics = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        return {**metrics, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "step_seconds": time.perf_counter() - began}

    def step_metrics(self, local: dict[str, float]) -> dict[str, float]:
        """Metrics of the update just made, averaged over ranks (a collective)."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        averaged = mean_over_workers({**local, "quarantined_pairs": float(len(self.quarantined))}, self.device)
        averaged["quarantined_pairs"] = round(averaged["quarantined_pairs"] * world)  # a sum over the ranks
        return {**averaged, "lr": self.last_lr, "step": self.update,
                "optimizer_steps": int(self.engine.global_steps), "micro_batches": self.update * self.accumulation,
                "resumed_from_update": self.resumed_from,
                "latent_cache_hits": self.encoder.hits, "latent_cache_misses": self.encoder.misses,
                "encoder_loads": self.encoders.loads}

    def export(self, uri: str, bucket_mb: float, extra: dict | None = None, fingerprint: bool = False) -> dict | None:
        """Write the publishable weights to ``uri`` (every rank calls; rank 0 writes, returns the manifest;
        ``fingerprint``: also the ``fp`` checksum that GPU routes verify with)."""
        return export_weights(self.engine, uri, self.lora, bucket_mb, extra, fingerprint)

    def export_and_stream(self, uri: str, bucket_mb: float, extra: dict | None, actors: list, nodes: list[str] | None,
                          version: int, transport: str = "auto", fingerprint: bool = False):
        """:meth:`export` and :meth:`stream` in one walk over the weights (see ``gapo.export.export_and_stream``)."""
        return export_and_stream(self.engine, uri, self.lora, bucket_mb, extra, actors, nodes, version, transport,
                                 fingerprint)

    def stream(self, actors: list, nodes: list[str] | None, version: int, bucket_mb: float, uri: str = "",
               transport: str = "auto"):
        """Stream the live weights to replica ``actors`` as ``version`` over ``transport`` (every rank calls;
        rank 0 gets ``(UpdateMeta, reports)``)."""
        return stream_live(self.engine, actors, nodes, version, self.lora, bucket_mb, uri, transport)
