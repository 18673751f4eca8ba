"""Rollout speed settings of a replica: the attention kernel and diffusers' step caches (docs/performance.md).

``generator.attention_backend``: ``auto`` lets torch choose; ``math``, ``flash``, ``efficient``, ``cudnn`` pin
torch's scaled-dot-product-attention kernel for every call of the pipeline (every family's attention goes through
it); any other name is a backend of diffusers' attention dispatcher (``flash`` of the flash-attn package is
``dispatcher:flash``, ``dispatcher:sage``, ...) for families whose attention goes through the dispatcher (Wan).
Each is checked at start-up on the replica's device, by a real call (one denoising step) under the pinned kernel:
a missing kernel is a ``ConfigError`` naming the setting, not a failure in the middle of a round. ``generator.cache``: diffusers' First Block Cache on the denoiser(s)
(a step whose first block's residual moved less than ``threshold`` reuses the other blocks' last residual),
reset after every pipeline call so one video's cached residuals never reach the next.
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


def use_step_cache(pipe, cache) -> None:
    """Enable ``generator.cache`` on every denoiser (``none``: nothing)."""
    if cache.kind == "none":
        return
    from diffusers import FirstBlockCacheConfig

    config = FirstBlockCacheConfig(threshold=cache.threshold)
    for m in denoisers(pipe):
        blocks = len(repeated_blocks(m))
        if blocks < 2:
            raise ConfigError(f"generator.cache.kind='first_block' needs a transformer of 2 blocks or more (the first "
                              f"decides, the others are reused); {type(m).__name__} has {blocks}")
        m.enable_cache(config)


def cache_leader_hooks(module: torch.nn.Module) -> list:
    """First Block Cache's deciding hooks inside ``module`` (the first block's; none without the cache)."""
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    hooks = [m._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK) for m in module.modules()
             if getattr(m, "_diffusers_hook", None) is not None]
    return [h for h in hooks if h is not None]


@contextlib.contextmanager
def reuse_forced(pipe):
    """Within: every step after a call's first reuses the cached residuals (threshold infinite), so a compiled
    replica's warm-up compiles the cache's reuse path too, not its first call in a round."""
    hooks = [h for d in denoisers(pipe) for h in cache_leader_hooks(d)]
    saved = [h.threshold for h in hooks]
    for h in hooks:
        h.threshold = float("inf")
    try:
        yield
    finally:
        for h, threshold in zip(hooks, saved):
            h.threshold = threshold


def reset_step_cache(pipe) -> None:
    """Forget what the last call cached (its residuals belong to other videos; diffusers' pipelines reset their
    hooks at the end of a call too, this holds whatever the pipeline does)."""
    for m in denoisers(pipe):
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks()
