"""Rollout speed settings on the tiny models (generation/speed.py): the attention kernel is checked at start-up
(a missing kernel is a ConfigError naming the setting), a pinned kernel renders what torch's own choice renders,
diffusers' dispatcher is used where a family's attention goes through it, First Block Cache changes the
frames only as far as its threshold allows and keeps nothing from one call to the next, and FasterCache and
TaylorSeer skip on their schedules."""

from __future__ import annotations

import numpy as np
import pytest

from anisora_ray.data.manifest import read_manifest
from anisora_ray.errors import ConfigError
from anisora_ray.generation.generator import Generator
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.types import GenerationRequest


def _generator(cfg, *assignments: tuple[str, object]) -> Generator:
    g = cfg.generator.model_copy(deep=True)
    for key, value in assignments:
        target = g
        *path, last = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, last, value)
    return Generator(resolve_pretrained(cfg.model, cfg.generator), cfg.model, g, cfg.video)


def _frames(gen: Generator, items, exact: bool = False) -> np.ndarray:
    return gen.render([GenerationRequest(items[0], (1, 2)), GenerationRequest(items[1], (3,))], exact=exact).astype(int)


def test_attention_backends_are_checked_at_start_up_and_a_pinned_kernel_renders_the_same(make_config, demo_manifest):
    cfg = make_config("generator.num_inference_steps=2")
    items = read_manifest(demo_manifest)
    auto = _frames(_generator(cfg), items)
    for backend in ("math", "flash"):  # torch's CPU kernels
        assert np.abs(_frames(_generator(cfg, ("attention_backend", backend)), items) - auto).max() <= 2, backend
    with pytest.raises(ConfigError, match=r"generator.attention_backend='cudnn': torch has no cudnn attention kernel "
                                          r"for this model's attention on cpu"):  # found by a real call at start-up
        _generator(cfg, ("attention_backend", "cudnn"))
    with pytest.raises(ConfigError, match="calls torch's attention directly"):  # CogVideoX's processor
        _generator(cfg, ("attention_backend", "dispatcher:native"))
    with pytest.raises(ConfigError, match="diffusers has no attention backend 'fastest'"):
        _generator(cfg, ("attention_backend", "dispatcher:fastest"))
    with pytest.raises(ConfigError, match="not one of auto"):
        _generator(cfg, ("attention_backend", "fast"))


def test_wan_uses_diffusers_dispatcher_and_names_a_missing_kernel(make_config, demo_manifest):
    cfg = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b", "generator.num_inference_steps=2")
    items = read_manifest(demo_manifest)
    auto = _frames(_generator(cfg), items)
    native = _generator(cfg, ("attention_backend", "dispatcher:native"))
    assert all(p._attention_backend == "native" for m in (native.pipe.transformer, native.pipe.transformer_2)
               for p in m.attn_processors.values())  # both experts
    assert np.abs(_frames(native, items) - auto).max() <= 2
    with pytest.raises(ConfigError, match="generator.attention_backend='dispatcher:flash'"):  # no flash-attn here
        _generator(cfg, ("attention_backend", "dispatcher:flash"))


@pytest.mark.parametrize("family", ["cogvideox_i2v", "wan_i2v"])
def test_first_block_cache_moves_the_frames_by_its_threshold_only_and_forgets_between_calls(make_config, demo_manifest,
                                                                                            family):
    one = make_config(f"model.family={family}", "generator.num_inference_steps=4")
    with pytest.raises(ConfigError, match="needs a transformer of 2 blocks or more"):  # the test size has one
        _generator(one, ("cache.kind", "first_block"))
    cfg = make_config(f"model.family={family}", "generator.num_inference_steps=4", "model.tiny.num_layers=3")
    items = read_manifest(demo_manifest)
    plain = _frames(_generator(cfg), items)
    exact = _generator(cfg, ("cache.kind", "first_block"), ("cache.threshold", 1e-12))
    np.testing.assert_array_equal(_frames(exact, items), plain)  # nothing is ever reused below the threshold
    loose = _generator(cfg, ("cache.kind", "first_block"), ("cache.threshold", 1e6))
    first = _frames(loose, items)
    assert np.abs(first - plain).max() > 0  # later steps reuse the first step's residuals
    np.testing.assert_array_equal(_frames(loose, items, exact=True), plain)  # the cache audit's reference
    np.testing.assert_array_equal(_frames(loose, items), first)  # a second call starts with an empty cache


def test_faster_cache_follows_its_schedule_forgets_between_calls_and_needs_batched_cfg(make_config, demo_manifest):
    """Step i > 0 below timestep 781 runs the conditional half only unless i % 5 == 0; on such a step below 681,
    attention is reused unless i % 2 == 0 (diffusers' FasterCache with the settings of generator.cache)."""
    cfg = make_config("generator.num_inference_steps=8")
    items = read_manifest(demo_manifest)
    plain = _frames(_generator(cfg), items)
    gen = _generator(cfg, ("cache.kind", "faster_cache"))
    timesteps, batches, attention = [], [], []  # the step's timestep, the batch its blocks see, attention computed
    gen.pipe.transformer.register_forward_pre_hook(lambda m, a, kw: timesteps.append(float(kw["timestep"][0])),
                                                   with_kwargs=True)
    block = gen.pipe.transformer.transformer_blocks[0]
    block.register_forward_pre_hook(lambda m, a, kw: batches.append((a or [kw["hidden_states"]])[0].shape[0]),
                                    with_kwargs=True)
    block.attn1.to_q.register_forward_hook(lambda *_: attention.append(1))
    first = _frames(gen, items)
    steps, full = list(zip(batches, timesteps)), batches[0]
    halved = [i > 0 and t < 781 and i % 5 != 0 for i, (_, t) in enumerate(steps)]
    assert [b for b, _ in steps] == [full // 2 if h else full for h in halved] and any(halved)
    reused = sum(h and t < 681 and i % 2 != 0 for i, (h, (_, t)) in enumerate(zip(halved, steps)))
    assert len(attention) == len(steps) - reused and reused > 0
    assert np.abs(first - plain).max() > 0  # approximated steps move the frames
    batches.clear()
    np.testing.assert_array_equal(_frames(gen, items, exact=True), plain)  # the cache audit's reference: exact ...
    assert batches == [full] * len(steps)  # ... every step runs both branches
    np.testing.assert_array_equal(_frames(gen, items), first)  # a second call starts with an empty cache
    # compiled, its hooks run outside the blocks' graphs; a warm-up retried in the same process wraps them once
    from anisora_ray.generation.speed import cache_hooks_outside_graphs, hooked

    assert cache_hooks_outside_graphs(gen.pipe, "faster_cache", dynamic=False) > 0
    wrapped = [(m.forward, h.fn_ref.original_forward) for m, h in hooked(gen.pipe.transformer, "faster_cache_block")]
    assert cache_hooks_outside_graphs(gen.pipe, "faster_cache", dynamic=False) == len(wrapped)
    assert [(m.forward, h.fn_ref.original_forward) for m, h in hooked(gen.pipe.transformer, "faster_cache_block")] \
        == wrapped
    wan = make_config("model.family=wan_i2v", "generator.num_inference_steps=2")
    with pytest.raises(ConfigError, match="model.family='wan_i2v' runs them as two calls"):
        _generator(wan, ("cache.kind", "faster_cache"))


@pytest.mark.parametrize("family", ["cogvideox_i2v", "wan_i2v"])
@pytest.mark.parametrize("predict", ["attention", "blocks"])
def test_taylorseer_computes_on_its_schedule_in_each_cfg_branch_and_forgets_between_calls(make_config, demo_manifest,
                                                                                          family, predict):
    """Steps 0..w-1 compute, then steps w+1, w+1+k, ...; the others predict what they hooked (each block's
    attention, or whole blocks). Wan calls the transformer twice a step (CFG's branches): each keeps its own state."""
    from anisora_ray.models.compile import repeated_blocks

    steps, w, k = 8, 2, 3
    cfg = make_config(f"model.family={family}", f"generator.num_inference_steps={steps}")
    items = read_manifest(demo_manifest)
    plain = _frames(_generator(cfg), items)
    every_step = _generator(cfg, ("cache.kind", "taylorseer"), ("cache.compute_every", 1), ("cache.predict", predict))
    np.testing.assert_array_equal(_frames(every_step, items), plain)  # nothing predicted: the frames are exact
    gen = _generator(cfg, ("cache.kind", "taylorseer"), ("cache.compute_every", k), ("cache.warmup_steps", w),
                     ("cache.predict", predict))
    calls, computed = [], set()  # transformer calls; those in which the first block's self-attention computed
    gen.pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    repeated_blocks(gen.pipe.transformer)[0].attn1.to_q.register_forward_hook(lambda *_: computed.add(len(calls)))
    first = _frames(gen, items)
    branches = 1 if gen.family.batched_cfg_layout else 2
    schedule = [s < w or (s - w - 1) % k == 0 for s in range(steps)]  # 0, 1, 3, 6 compute
    per_call = [c for c in schedule for _ in range(branches)]
    assert calls and len(calls) % len(per_call) == 0
    assert [i + 1 in computed for i in range(len(calls))] == per_call * (len(calls) // len(per_call))
    assert np.abs(first - plain).max() > 0  # predicted steps move the frames
    np.testing.assert_array_equal(_frames(gen, items, exact=True), plain)  # the cache audit's reference
    np.testing.assert_array_equal(_frames(gen, items), first)  # a second call starts with an empty cache


def test_taylorseer_names_what_it_predicts_and_refuses_a_model_with_nothing_to_predict():
    import torch

    from anisora_ray.generation.speed import taylorseer_targets

    class Attention(torch.nn.Linear):
        pass

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1, self.ff = Attention(4, 4), torch.nn.Linear(4, 4)

    model = torch.nn.Module()
    model.transformer_blocks = torch.nn.ModuleList([Block(), Block()])
    assert taylorseer_targets(model, "attention") == [r"transformer_blocks\.0\.attn1", r"transformer_blocks\.1\.attn1"]
    assert taylorseer_targets(model, "blocks") == [r"transformer_blocks\.0", r"transformer_blocks\.1"]
    model.transformer_blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with pytest.raises(ConfigError, match="found nothing to predict in Module"):
        taylorseer_targets(model, "attention")


def test_warm_up_steps_reach_every_path_of_the_cache():
    from anisora_ray.config import GeneratorConfig
    from anisora_ray.generation.speed import warm_up_steps

    def steps(a: int, u: int) -> int:
        return warm_up_steps(GeneratorConfig(cache={"kind": "faster_cache", "attention_skip_range": a,
                                                    "unconditional_skip_range": u}).cache)

    assert steps(2, 5) == 3  # 1: attention reused on the halved batch, 2: computed on it
    assert steps(3, 5) == 4 and steps(3, 2) == 4  # computed on the halved batch first at step 3
    assert steps(2, 2) == 2  # odd steps halve and reuse; even steps run both branches: nothing else occurs
    assert warm_up_steps(GeneratorConfig(cache={"kind": "first_block"}).cache) == 2
    # TaylorSeer: its warm-up steps compute, the next one predicts (with compute_every 1 none does)
    assert warm_up_steps(GeneratorConfig(cache={"kind": "taylorseer", "warmup_steps": 3}).cache) == 4
    assert warm_up_steps(GeneratorConfig(cache={"kind": "taylorseer", "warmup_steps": 3, "compute_every": 1}).cache) == 3


def test_a_pinned_kernel_composes_with_compile(make_config, demo_manifest):
    cfg = make_config("generator.num_inference_steps=2")
    items = read_manifest(demo_manifest)
    eager = _frames(_generator(cfg), items)
    compiled = _generator(cfg, ("attention_backend", "math"), ("compile", True))
    assert compiled.startup["compiled_blocks"] == len(compiled.pipe.transformer.transformer_blocks)
    graphs = compiled.compiled_graphs()
    first = _frames(compiled, items)
    np.testing.assert_array_equal(_frames(compiled, items), first)  # repeatable within the configuration
    assert compiled.compiled_graphs() == graphs  # the pinned kernel is what the warm-up compiled
    assert np.abs(first - eager).max() <= 3
