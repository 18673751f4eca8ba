"""Rollout speed settings on the tiny models (generation/speed.py): the attention kernel is checked at start-up
(a missing kernel is a ConfigError naming the setting), a pinned kernel renders what torch's own choice renders,
diffusers' dispatcher is used where a family's attention goes through it, and First Block Cache changes the
frames only as far as its threshold allows and keeps nothing from one call to the next."""

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


def _frames(gen: Generator, items) -> np.ndarray:
    return gen.render([GenerationRequest(items[0], (1, 2)), GenerationRequest(items[1], (3,))]).astype(int)


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
    np.testing.assert_array_equal(_frames(loose, items), first)  # a second call starts with an empty cache


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
