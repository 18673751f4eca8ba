"""generator.compile on the tiny model: compiled once at start-up, reused across prompts and weight refreshes
(a full refresh and the second LoRA refresh compile nothing), repeatable frames; and the generation-speed
benchmark runs at tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from anisora_ray.config import GeneratorConfig, LoraConfig, ModelConfig, TinyModelConfig, VideoConfig
from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.generator import Generator
from anisora_ray.models.pipeline import load_i2v_pipeline
from anisora_ray.models.tiny import save_tiny_i2v_pipeline
from anisora_ray.types import GenerationRequest
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.update import base_targets
from tests.conftest import REPO, in_memory_update

LORA = LoraConfig(r=2, alpha=4, target_modules=["to_q", "to_v"])


def _lora_tensors(path: str, seed: int) -> list:
    transformer = load_i2v_pipeline(path).transformer
    lora_io.add_adapter(transformer, LORA)
    g = torch.Generator().manual_seed(seed)
    return sorted((k, torch.randn(v.shape, generator=g) * 0.5) for k, v in lora_io.adapter_state(transformer).items())


def test_compiled_generator_compiles_once_across_prompts_and_refreshes(tmp_path, demo_manifest):
    items = read_manifest(demo_manifest)
    path = save_tiny_i2v_pipeline(TinyModelConfig(warm_start_steps=0), 32, 32, 9, str(tmp_path / "tiny"))
    cfg = GeneratorConfig(height=32, width=32, num_frames=9, num_inference_steps=2, candidates_per_prompt=2, compile=True)
    gen = Generator(path, ModelConfig(), cfg, VideoConfig())
    assert gen.startup["compiled_blocks"] == len(gen.pipe.transformer.transformer_blocks)
    assert gen.startup["compile_seconds"] > 0 and gen.startup_report()["replica_id"] == gen.replica_id
    graphs = gen.compiled_graphs()
    assert graphs >= 1  # the warm-up call compiled

    def render(i: int) -> np.ndarray:
        return gen.render([GenerationRequest(items[i], (1, 2))])

    first = render(0)
    render(1)
    assert gen.compiled_graphs() == graphs  # another prompt, same geometry: no recompilation
    assert np.array_equal(render(0), first)  # a seed gives the same frames within one configuration

    full = sorted((k, v + 0.05 * torch.randn_like(v)) for k, v in base_targets(gen.pipe.transformer).items())
    gen.load_weights(*in_memory_update(1, full, "full"))
    after_full = render(0)
    assert gen.compiled_graphs() == graphs  # copied into the same parameters
    assert not np.array_equal(after_full, first)

    gen.load_weights(*in_memory_update(2, _lora_tensors(path, 0), "lora", LORA))  # adds the adapter: may compile once
    v2 = render(0)
    with_adapter = gen.compiled_graphs()
    gen.load_weights(*in_memory_update(3, _lora_tensors(path, 1), "lora", LORA))
    v3 = render(0)
    assert gen.compiled_graphs() == with_adapter  # the second LoRA refresh recompiles nothing
    assert gen.weights_version == 3 and not np.array_equal(v2, v3)


@pytest.mark.parametrize("family", ["cogvideox_i2v", "wan_i2v"])
def test_generation_speed_benchmark_runs_on_the_tiny_model(tmp_path, family):
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "generation_speed.py"), "--tiny",
                           "--family", family, "--batches", "1,2", "--compile-batches", "2", "--measure-steps", "2",
                           "--set", f"model.cache_dir={tmp_path / 'cache'}", "--set", "model.tiny.warm_start_steps=0",
                           "--set", "model.tiny.num_layers=2", "--steps", "4",
                           "--variant", "sdpa-math=generator.attention_backend=math",
                           "--variant", "fbc=generator.cache.kind=first_block,generator.cache.threshold=1e6",
                           "--variant", "fc=generator.cache.kind=faster_cache",
                           "--variant", "ts=generator.cache.kind=taylorseer,generator.cache.warmup_steps=1",
                           "--variant", "cudnn=generator.attention_backend=cudnn",
                           "--variant", "fp8=generator.quantize=fp8,model.dtype=bfloat16",
                           "--variant", "distilled=generator.num_inference_steps=2,generator.guidance_scale=1,"
                                        "generator.flow_shift=5",
                           "--exact-check", "--out", str(tmp_path / "run"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["videos_per_call"]): r for r in result["rows"]}
    assert set(rows) == {("eager", 1), ("eager", 2), ("compiled", 2)}
    for r in rows.values():
        assert r["measured_steps"] == 2 and r["step_s"] > 0 and r["seconds_per_video"] > 0
        assert r["calls_per_step"] == (1 if family == "cogvideox_i2v" else 2)  # Wan calls cond and uncond apart
    assert rows[("eager", 1)]["speedup_vs_eager_b1"] == 1.0
    assert result["compile_s"] > 0 and result["compiled_repeatable"] is True
    assert "seconds per video" in done.stdout
    # variants on replicas of their own at the full 4 steps, against the config's: time and drift
    variants = {v["variant"]: v for v in result["variants"]}
    assert list(variants) == ["eager (config)", "sdpa-math", "fbc", "fc", "ts", "cudnn", "fp8", "distilled"]
    assert variants["eager (config)"]["denoiser_calls"] == 4 * (1 if family == "cogvideox_i2v" else 2)
    if family == "wan_i2v":  # a step-distilled protocol: 2 steps without CFG, one call each
        assert variants["distilled"]["denoiser_calls"] == variants["distilled"]["steps"] == 2
        assert variants["distilled"]["guidance_scale"] == 1.0
    else:
        assert "generator.flow_shift applies to flow-matching families" in variants["distilled"]["error"]
    assert variants["sdpa-math"]["drift_max_levels"] <= 2 and variants["sdpa-math"]["steps"] == 4
    assert variants["fbc"]["drift_max_levels"] > 0 and variants["fbc"]["psnr_db"] > 0  # reused residuals move frames
    if family == "cogvideox_i2v":  # FasterCache approximates the unconditional half of steps 1-3
        assert variants["fc"]["drift_max_levels"] > 0 and "error" not in variants["fc"]
    else:
        assert "wan_i2v calls it twice per step" in variants["fc"]["error"]  # refused with the config
    assert variants["ts"]["drift_max_levels"] > 0 and "error" not in variants["ts"]  # steps 1, 3 predicted, any family
    branches = 1 if family == "cogvideox_i2v" else 2  # each of Wan's CFG calls decides on its own
    assert variants["ts"]["cache_decisions"] == {"computed": 2 * branches, "reused": 2 * branches}  # 0, 2 | 1, 3
    for name in ("fbc", "ts", *(("fc",) if family == "cogvideox_i2v" else ())):  # --exact-check: the audit's reference
        assert variants[name]["exact_drift_max_levels"] == 0 and variants[name]["exact_seconds_per_video"] > 0, name
    assert "exact_seconds_per_video" not in variants["sdpa-math"]  # no cache, nothing to check
    assert "generator.attention_backend='cudnn'" in variants["cudnn"]["error"]  # no such kernel on the CPU
    assert "generator.quantize='fp8' needs a CUDA GPU" in variants["fp8"]["error"]


def test_dpm_rollout_scheduler_renders_its_own_samples(tmp_path, demo_manifest):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    item = read_manifest(demo_manifest)[0]
    path = save_tiny_i2v_pipeline(TinyModelConfig(warm_start_steps=0), 32, 32, 9, str(tmp_path / "tiny"))
    videos = {}
    for name, cls in (("pretrained", CogVideoXDDIMScheduler), ("dpm", CogVideoXDPMScheduler)):
        cfg = GeneratorConfig(height=32, width=32, num_frames=9, num_inference_steps=4, scheduler=name)
        gen = Generator(path, ModelConfig(), cfg, VideoConfig())
        assert type(gen.pipe.scheduler) is cls
        videos[name] = gen.render([GenerationRequest(item, (1, 2))])
        assert np.array_equal(videos[name], gen.render([GenerationRequest(item, (1, 2))]))  # repeatable
    assert videos["dpm"].shape == videos["pretrained"].shape == (2, 9, 32, 32, 3)
    assert not np.array_equal(videos["dpm"], videos["pretrained"])  # another sampler, other samples


@pytest.mark.parametrize("cached", [{"kind": "first_block", "threshold": 1e6}, {"kind": "faster_cache"},
                                    {"kind": "taylorseer", "compute_every": 3, "warmup_steps": 2},
                                    {"kind": "taylorseer", "compute_every": 3, "warmup_steps": 2, "predict": "blocks"}],
                         ids=["first_block", "faster_cache", "taylorseer", "taylorseer_blocks"])
def test_compiled_replica_composes_with_a_step_cache(tmp_path, demo_manifest, cached):
    """A cache decides on the host (between blocks; in FasterCache's and TaylorSeer's hooks, by a step counter): the
    compiled replica keeps those decisions out of its graphs, warms up every path at start-up (no graph compiles
    in a call, FasterCache's halved batches included), reuses as the eager one does, and repeats its frames; forced
    to compute every step (the cache audit), it renders the uncached frames with the same graphs."""
    request = GenerationRequest(read_manifest(demo_manifest)[0], (1, 2))
    path = save_tiny_i2v_pipeline(TinyModelConfig(num_layers=2, warm_start_steps=0), 32, 32, 9, str(tmp_path / "tiny"))
    steps = 3 if cached["kind"] == "first_block" else 8  # first_block: every step after the first reuses
    videos = {}
    for name, kw in (("eager", {}), ("cached", {"cache": cached}), ("compiled_cached", {"cache": cached, "compile": True})):
        cfg = GeneratorConfig(height=32, width=32, num_frames=9, num_inference_steps=steps, candidates_per_prompt=2, **kw)
        gen = Generator(path, ModelConfig(), cfg, VideoConfig())
        graphs = gen.compiled_graphs()
        videos[name] = gen.render([request])
        if name == "compiled_cached":  # every path of the cache was compiled at start-up
            assert gen.compiled_graphs() == graphs
            assert np.array_equal(gen.render([request]), videos[name])
            videos["compiled_exact"] = gen.render([request], exact=True)  # the cache audit's reference ...
            assert gen.compiled_graphs() == graphs  # ... runs the graphs compiled at start-up
    assert np.abs(videos["cached"].astype(int) - videos["eager"].astype(int)).max() > 2  # the cache changes frames
    assert np.abs(videos["compiled_cached"].astype(int) - videos["cached"].astype(int)).max() <= 2
    assert np.abs(videos["compiled_exact"].astype(int) - videos["eager"].astype(int)).max() <= 2  # every step computed
