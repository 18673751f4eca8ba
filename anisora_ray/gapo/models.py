"""What a GAPO worker holds in memory: the transformer, its frozen reference, and encoders only on demand.

- The transformer is loaded without the VAE and text encoder (T5-XXL alone is ~9.5 GB at 5B).
  :class:`Encoders` loads them the first time a latent is missing from the cache and releases them
  once the worker's pairs are encoded; with a warm cache they are never loaded.
- Full fine-tuning compares against a frozen reference loaded from storage (never a deep copy of
  the policy): the pretrained weights every round (``gapo.reference_weights: base``, as the paper) or
  the round's starting weights (``previous_round``); by default a ZeRO-3 DeepSpeed inference engine whose parameters are sliced across the
  workers whatever the training stage (1/N of the model per GPU; on the host with
  ``gapo.reference_offload`` or the JSON's ``offload_param``), or with ``gapo.reference: copy`` a
  frozen copy on every worker in the training precision (fastest, most memory). LoRA compares
  against its own transformer with the adapter disabled.
"""

from __future__ import annotations

import copy
import gc

import torch

from anisora_ray.config import AnisoraConfig
from anisora_ray.models.families import DTYPES, get_family
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.update import load_folder


def load_transformer_pipeline(pretrained: str, cfg: AnisoraConfig, device: torch.device | str):
    """The family's pipeline with its trained modules and the rollouts' scheduler only (encoders left unloaded)."""
    family = get_family(cfg.model.family)
    pipe = family.load(pretrained, cfg.model.dtype, str(device), cfg.model.revision, "trainer")
    family.use_sampler(pipe, cfg.generator)  # the training grid's shift is the rollouts' (generator.flow_shift)
    return pipe


class Encoders:
    """The VAE and text encoder, loaded on first use (a cache miss) and released after encoding."""

    def __init__(self, pretrained: str, cfg: AnisoraConfig, device: torch.device | str):
        self.pretrained, self.cfg, self.device = pretrained, cfg, device
        self._pipe = None
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    def __call__(self):
        """A pipeline holding the encoders (the VAE with tiling / slicing as the generator's, text and image
        encoders), without the trained modules."""
        if self._pipe is None:
            m = self.cfg.model
            pipe = get_family(m.family).load(self.pretrained, m.dtype, str(self.device), m.revision, "encoders")
            if self.cfg.generator.vae_slicing:
                pipe.vae.enable_slicing()
            if self.cfg.generator.vae_tiling:
                pipe.vae.enable_tiling()
            self._pipe, self.loads = pipe, self.loads + 1
        return self._pipe

    def release(self) -> None:
        if self._pipe is None:
            return
        self._pipe = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class FrozenReference:
    """A frozen module called like the transformer (``dtype`` for the inputs' cast)."""

    def __init__(self, module, dtype: torch.dtype, adapter_off: bool = False):
        self.module, self.dtype, self.adapter_off = module, dtype, adapter_off

    def __call__(self, **kwargs):
        if not self.adapter_off:
            return self.module(**kwargs)
        target = getattr(self.module, "module", self.module)
        target.disable_adapters()
        try:
            return self.module(**kwargs)
        finally:
            target.enable_adapters()


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def training_dtype(ds_config: dict, model_dtype: torch.dtype) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return model_dtype


def reference_config(ds_config: dict, offload: bool = False) -> dict:
    """DeepSpeed config of the partitioned frozen reference: ZeRO-3 without optimizer, whatever the training
    stage; ZeRO-3 tuning keys and parameter offload as the training JSON has them (``offload`` forces it)."""
    ref = {k: copy.deepcopy(v) for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    train_zero = ds_config.get("zero_optimization", {})
    zero = {k: copy.deepcopy(v) for k, v in train_zero.items() if k.startswith("stage3_") or k == "offload_param"}
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    ref["zero_optimization"] = {"stage": 3, **zero}
    return ref


def build_policy(transformer, cfg: AnisoraConfig, init_uri: str | None):
    """The trained module: the transformer itself (full) or its ``gapo`` LoRA adapter, from ``init_uri``."""
    g = cfg.gapo
    transformer.eval().requires_grad_(False)
    if g.lora.r > 0:
        lora_io.add_adapter(transformer, g.lora)
    if init_uri:
        load_folder(transformer, init_uri)
    for name, param in transformer.named_parameters():
        param.requires_grad_(g.lora.r == 0 or f".{lora_io.ADAPTER}." in name)
    if g.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def build_reference(engine, pretrained: str, cfg: AnisoraConfig, ds_config: dict, init_uri: str | None,
                    device: torch.device | str) -> FrozenReference:
    """The frozen model GAPO compares against (see the module docstring)."""
    import deepspeed

    dtype = training_dtype(ds_config, DTYPES[cfg.model.dtype])
    if cfg.gapo.lora.r > 0:
        return FrozenReference(engine.module, dtype, adapter_off=True)
    partitioned = cfg.gapo.reference == "partitioned"
    pipe = load_transformer_pipeline(pretrained, cfg, "cpu" if partitioned else device)
    transformer = get_family(cfg.model.family).trained_module(pipe)
    transformer.requires_grad_(False)
    if init_uri and cfg.gapo.reference_weights == "previous_round":
        load_folder(transformer, init_uri)
    if not partitioned:  # cast as DeepSpeed casts the policy: parameters only (Wan's rotary tables stay fp32)
        transformer.to(device=device)
        for p in transformer.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        return FrozenReference(transformer, dtype)
    ref_engine, *_ = deepspeed.initialize(model=transformer, config=reference_config(ds_config, cfg.gapo.reference_offload))
    ref_engine.eval()
    return FrozenReference(ref_engine, dtype)
