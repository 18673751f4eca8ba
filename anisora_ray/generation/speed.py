"""Rollout speed settings of a replica: the attention kernel and diffusers' step caches (docs/performance.md).

``generator.attention_backend``: ``auto`` lets torch choose; ``math``, ``flash``, ``efficient``, ``cudnn`` pin
torch's scaled-dot-product-attention kernel for every call of the pipeline (every family's attention goes through
it); any other name is a backend of diffusers' attention dispatcher (``flash`` of the flash-attn package is
``dispatcher:flash``, ``dispatcher:sage``, ...) for families whose attention goes through the dispatcher (Wan).
Each is checked at start-up on the replica's device, by a real call (one denoising step) under the pinned kernel:
a missing kernel is a ``ConfigError`` naming the setting, not a failure in the middle of a round.
``generator.cache``: diffusers' FasterCache (a fixed schedule: the unconditional half of CFG's batch and
self-attention reused on some steps; families that batch CFG), TaylorSeer (a fixed schedule: attention or whole
blocks computed every ``compute_every`` steps, predicted in between; any family) or First Block Cache (a step whose
first block's residual moved less than ``threshold`` reuses the other blocks' last residual) on the denoiser(s),
reset after every pipeline call so one video's cached tensors never reach the next.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from anisora_ray.errors import ConfigError
from anisora_ray.models.compile import repeated_blocks

SDPA = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION}
DISPATCHER = "dispatcher:"


def denoisers(pipe) -> list[torch.nn.Module]:
    """The pipeline's transformer(s): one, or Wan2.2 A14B's two experts."""
    return [m for m in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None)) if m is not None]


def attention_context(backend: str):
    """The context every pipeline call runs in: torch's SDPA kernel pinned, or nothing to do."""
    return sdpa_kernel([SDPA[backend]]) if backend in SDPA else contextlib.nullcontext()


NO_KERNEL = ("No available kernel", "No viable backend")  # torch's SDPA, when every allowed kernel refuses a call


@contextlib.contextmanager
def attention_checked(backend: str, device):
    """Around a replica's first real call: a pinned SDPA kernel that refuses this model's attention (its shapes,
    strides, dtype, device) becomes a ``ConfigError`` naming the setting. A small probe is not enough: on an H200
    (torch 2.11) cuDNN attention ran a 16-token probe, then found no kernel for CogVideoX-5B's first compiled call
    at 49x480x720."""
    try:
        yield
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if backend not in SDPA or not any(marker in first for marker in NO_KERNEL):
            raise
        raise ConfigError(f"generator.attention_backend={backend!r}: torch has no {backend} attention kernel for this "
                          f"model's attention on {device} ({first}); use 'auto' or another of {sorted(SDPA)}") from exc


def use_attention_backend(pipe, backend: str, family) -> None:
    """Validate ``generator.attention_backend`` on the loaded pipeline and set a dispatcher backend."""
    if backend == "auto":
        return
    if backend in SDPA:  # checked on the replica's first real call (attention_checked)
        return
    if not backend.startswith(DISPATCHER):
        raise ConfigError(f"generator.attention_backend={backend!r}: not one of auto, {', '.join(sorted(SDPA))} "
                          f"or {DISPATCHER}<diffusers backend>")
    name = backend[len(DISPATCHER):]
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = sorted(b.value for b in AttentionBackendName)
    if name not in known:
        raise ConfigError(f"generator.attention_backend={backend!r}: diffusers has no attention backend {name!r} "
                          f"(it has {', '.join(known)})")
    if not family.attention_dispatcher:
        raise ConfigError(f"generator.attention_backend={backend!r}: model.family={family.name!r} calls torch's "
                          f"attention directly, not diffusers' dispatcher; use one of auto, {', '.join(sorted(SDPA))}")
    try:
        for m in denoisers(pipe):
            m.set_attention_backend(name)
    except (ImportError, RuntimeError, ValueError) as exc:  # the kernel's package is missing or too old
        raise ConfigError(f"generator.attention_backend={backend!r}: {exc}") from exc


def use_step_cache(pipe, cache, family) -> None:
    """Enable ``generator.cache`` on every denoiser (``none``: nothing)."""
    if cache.kind == "none":
        return
    from diffusers import FasterCacheConfig, FirstBlockCacheConfig, TaylorSeerCacheConfig

    if cache.kind == "faster_cache":
        if family.batched_cfg_layout is None:
            raise ConfigError(f"generator.cache.kind='faster_cache' needs a pipeline that runs CFG's two branches as one "
                              f"batch; model.family={family.name!r} runs them as two calls: use 'first_block'")
        config = FasterCacheConfig(  # diffusers' CogVideoX settings: attention weight 0.3, its timestep ranges
            spatial_attention_block_skip_range=cache.attention_skip_range,
            spatial_attention_timestep_skip_range=(-1, 681), spatial_attention_block_identifiers=("transformer_blocks",),
            unconditional_batch_skip_range=cache.unconditional_skip_range, unconditional_batch_timestep_skip_range=(-1, 781),
            low_frequency_weight_update_timestep_range=(99, 641), attention_weight_callback=lambda _: 0.3,
            current_timestep_callback=lambda: pipe.current_timestep, tensor_format=family.batched_cfg_layout)
    else:
        config = FirstBlockCacheConfig(threshold=cache.threshold)
    for m in denoisers(pipe):
        blocks = len(repeated_blocks(m))
        if cache.kind == "first_block" and blocks < 2:
            raise ConfigError(f"generator.cache.kind='first_block' needs a transformer of 2 blocks or more (the first "
                              f"decides, the others are reused); {type(m).__name__} has {blocks}")
        if cache.kind == "taylorseer":  # per denoiser: the patterns name its own modules
            config = TaylorSeerCacheConfig(cache_interval=cache.compute_every, disable_cache_before_step=cache.warmup_steps,
                                           max_order=cache.order, taylor_factors_dtype=m.dtype,
                                           cache_identifiers=taylorseer_targets(m, cache.predict))
        m.enable_cache(config)


def taylorseer_targets(module: torch.nn.Module, predict: str) -> list[str]:
    """Exact-name patterns of what TaylorSeer predicts in ``module``: each repeated block, or the attention modules
    directly inside them (diffusers' default patterns, ``^blocks.*attn``, miss ``attn1``/``attn2``)."""
    import re

    blocks = repeated_blocks(module)
    targets = blocks if predict == "blocks" else [c for b in blocks for c in b.children()
                                                   if type(c).__name__.endswith("Attention")]
    if not targets:  # an empty list would fall back to diffusers' patterns, which hook nothing here
        raise ConfigError(f"generator.cache.kind='taylorseer' (predict={predict!r}) found nothing to predict in "
                          f"{type(module).__name__}: no repeated blocks, or no attention module directly inside them")
    names = {id(m): name for name, m in module.named_modules()}
    return [re.escape(names[id(t)]) for t in targets]


def cache_hooks_outside_graphs(pipe, kind: str, **compile_kwargs) -> int:
    """FasterCache and TaylorSeer decide in Python on every call of a hooked module (a step counter, the timestep):
    traced into a compiled block, each step would compile a new graph. The hooks run outside the block's graph
    (``torch.compiler.disable``); the module they call when they compute is compiled on its own. Returns how
    many hooked modules (0 for a cache ``kind`` without such hooks). Once per hook: a warm-up retried in the same
    process does not wrap them again."""
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    name = {"faster_cache": _FASTER_CACHE_BLOCK_HOOK, "taylorseer": _TAYLORSEER_CACHE_HOOK}.get(kind)
    hooks = [mh for d in denoisers(pipe) for mh in hooked(d, name)] if name else []
    for m, hook in hooks:
        if getattr(hook, "_outside_graphs", False):
            continue
        hook.fn_ref.original_forward = torch.compile(hook.fn_ref.original_forward, **compile_kwargs)
        m.forward = torch.compiler.disable(m.forward)
        hook._outside_graphs = True
    return len(hooks)


def hooked(module: torch.nn.Module, name: str) -> list[tuple[torch.nn.Module, object]]:
    """(submodule, hook) for every submodule of ``module`` holding the diffusers hook registered as ``name``."""
    found = [(m, m._diffusers_hook.get_hook(name)) for m in module.modules()
             if getattr(m, "_diffusers_hook", None) is not None]
    return [(m, h) for m, h in found if h is not None]


def cache_leader_hooks(module: torch.nn.Module) -> list:
    """First Block Cache's deciding hooks inside ``module`` (the first block's; none without the cache)."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    return [h for _, h in hooked(module, _FBC_LEADER_BLOCK_HOOK)]


def warm_up_steps(cache) -> int:
    """Denoising steps (under ``reuse_forced``) that take a compiled replica through every path its cache has.
    First Block Cache: 2 (compute, reuse). FasterCache, at step i > 0: the unconditional branch skipped unless
    i % unconditional_skip_range == 0, and then attention skipped unless i % attention_skip_range == 0 (each
    a batch size or a path of its own); the first steps that show every case of a whole period. TaylorSeer: its
    warm-up steps, then one predicted step (none is predicted with compute_every 1)."""
    if cache.kind == "taylorseer":
        return cache.warmup_steps + (cache.compute_every > 1)
    if cache.kind != "faster_cache":
        return 2
    a, u = cache.attention_skip_range, cache.unconditional_skip_range

    def case(i: int) -> str:
        return "both branches" if i % u == 0 else "attention reused" if i % a else "attention computed"

    every = {case(0)} | {case(i) for i in range(1, a * u + 1)}
    seen = {case(0)}
    for i in range(1, a * u + 1):
        seen.add(case(i))
        if seen == every:
            return i + 1
    return 1


@contextlib.contextmanager
def overridden(settings: list[tuple[object, str, object]]):
    """Within: each (hook, attribute, value) set; the hooks' own values back afterwards."""
    saved = [getattr(h, name) for h, name, _ in settings]
    for h, name, value in settings:
        setattr(h, name, value)
    try:
        yield
    finally:
        for (h, name, _), value in zip(settings, saved):
            setattr(h, name, value)


def cache_settings(pipe, threshold: float, skip_range: tuple[float, float], taylorseer_after: int | None = None,
                   ) -> list[tuple[object, str, object]]:
    """(hook, attribute, value) for the step-cache hooks of every denoiser: First Block Cache's ``threshold``,
    FasterCache's timestep ranges (``skip_range``) and, when given, TaylorSeer's last cached step."""
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    settings = []
    for d in denoisers(pipe):
        settings += [(h, "threshold", threshold) for h in cache_leader_hooks(d)]
        settings += [(h, "unconditional_batch_timestep_skip_range", skip_range)
                     for _, h in hooked(d, _FASTER_CACHE_DENOISER_HOOK)]
        settings += [(h, "timestep_skip_range", skip_range) for _, h in hooked(d, _FASTER_CACHE_BLOCK_HOOK)]
        if taylorseer_after is not None:
            settings += [(h, "disable_cache_after_step", taylorseer_after) for _, h in hooked(d, _TAYLORSEER_CACHE_HOOK)]
    return settings


@contextlib.contextmanager
def reuse_forced(pipe):
    """Within: every step after a call's first may reuse what the cache holds, whatever its thresholds
    (First Block Cache's threshold infinite, FasterCache's timestep ranges unbounded), so a compiled replica's
    warm-up compiles the cache's reuse paths too, not its first call in a round."""
    with overridden(cache_settings(pipe, float("inf"), (-float("inf"), float("inf")))):
        yield


@contextlib.contextmanager
def exact_forced(pipe):
    """Within: every step computes everything, whatever the cache's schedule or threshold (First Block Cache's
    threshold -inf, FasterCache's timestep ranges empty, TaylorSeer past its last cached step), so a call renders
    what the replica renders without its cache, bit for bit, with the hooks and compiled graphs it has (the cache
    audit's reference, eval/cache_audit.py)."""
    with overridden(cache_settings(pipe, -float("inf"), (float("inf"), -float("inf")), taylorseer_after=0)):
        yield


def frame_drift(frames, reference) -> dict[str, float]:
    """How far ``frames`` moved from ``reference`` (uint8 videos of one shape): mean and max absolute difference in
    levels, the mean squared difference, and PSNR in dB (inf when equal)."""
    import numpy as np

    if frames.shape != reference.shape:
        raise ValueError(f"frame_drift: shapes {frames.shape} and {reference.shape} differ")
    diff = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    return {"drift_mean_levels": float(diff.mean()), "drift_max_levels": float(diff.max()), "mse": mse,
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))}


def reset_step_cache(pipe) -> None:
    """Forget what the last call cached (its residuals belong to other videos; diffusers' pipelines reset their
    hooks at the end of a call too, this holds whatever the pipeline does)."""
    for m in denoisers(pipe):
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks()
