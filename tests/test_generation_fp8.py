"""generator.quantize: fp8 — refused with a clear error where it cannot run (the CPU here); on a GPU with FP8
tensor cores (skipped elsewhere, with the reason): the block linears are FP8, frames stay near bf16's, and a full
or LoRA refresh lands in the quantized replica (the new weights, re-quantized and checked; compiled, nothing
recompiles)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from anisora_ray.config import GeneratorConfig, LoraConfig, ModelConfig, TinyModelConfig, VideoConfig
from anisora_ray.data.manifest import read_manifest
from anisora_ray.errors import ConfigError
from anisora_ray.generation.generator import Generator
from anisora_ray.models.pipeline import load_i2v_pipeline
from anisora_ray.models.tiny import save_tiny_i2v_pipeline
from anisora_ray.types import GenerationRequest
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.update import base_targets
from tests.conftest import in_memory_update


def _fp8_device() -> str | None:
    """Why FP8 cannot be tested here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.cuda.get_device_capability() < (8, 9):
        return f"{torch.cuda.get_device_name()} has no FP8 tensor cores (compute capability < 8.9)"
    try:
        import torchao  # noqa: F401
    except ImportError:
        return "torchao is not installed (pip install 'anisora-ray[fp8]')"
    return None


needs_fp8 = pytest.mark.skipif(_fp8_device() is not None, reason=f"FP8 needs a GPU with FP8 and torchao: {_fp8_device()}")
LORA = LoraConfig(r=4, alpha=8, target_modules=["to_q", "to_v"])


def _cfg(**kw) -> GeneratorConfig:
    return GeneratorConfig(height=32, width=32, num_frames=9, num_inference_steps=4, candidates_per_prompt=2, **kw)


def test_fp8_is_refused_where_it_cannot_run(tmp_path):
    with pytest.raises(ValidationError, match="quantize"):
        GeneratorConfig(quantize="int4")
    path = save_tiny_i2v_pipeline(TinyModelConfig(num_layers=2), 32, 32, 9, str(tmp_path / "tiny"))
    if _fp8_device() is None:
        pytest.skip("this machine runs FP8: nothing to refuse")
    reason = "needs a CUDA GPU" if not torch.cuda.is_available() else "compute capability|torchao"
    with pytest.raises(ConfigError, match=f"generator.quantize='fp8' ({reason})"):
        Generator(path, ModelConfig(dtype="bfloat16"), _cfg(quantize="fp8"), VideoConfig())


def _levels(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b.astype(np.int64)).mean())


@pytest.fixture(scope="module")
def fp8_setup(tmp_path_factory):
    from anisora_ray.data.demo import make_demo_set

    root = tmp_path_factory.mktemp("fp8")
    tiny = TinyModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=32)
    path = save_tiny_i2v_pipeline(tiny, 32, 32, 9, str(root / "tiny"))
    other = save_tiny_i2v_pipeline(tiny.model_copy(update={"init_seed": 1}), 32, 32, 9, str(root / "other"))
    item = read_manifest(make_demo_set(str(root / "demo"), num_prompts=1, image_size=64, seed=0))[0]
    full = sorted((k, v.to(torch.bfloat16)) for k, v in base_targets(load_i2v_pipeline(other).transformer).items())
    transformer = load_i2v_pipeline(path).transformer
    lora_io.add_adapter(transformer, LORA)
    g = torch.Generator().manual_seed(0)
    lora = sorted((k, (torch.randn(v.shape, generator=g) * 0.3).to(torch.bfloat16))
                  for k, v in lora_io.adapter_state(transformer).items())
    return {"path": path, "request": GenerationRequest(item, (1, 2)), "full": full, "lora": lora}


def _replica(setup, **kw) -> Generator:
    return Generator(setup["path"], ModelConfig(dtype="bfloat16"), _cfg(device="cuda", **kw), VideoConfig())


def _check_quantized(gen: Generator, expected: dict[str, torch.Tensor] | None = None) -> int:
    """Every block linear is FP8; with ``expected`` (plain names -> weights), each dequantizes near it."""
    from anisora_ray.generation.quantize import block_linears, is_quantized

    transformer = gen.pipe.transformer
    layers = block_linears(transformer)
    assert layers and all(is_quantized(layer.weight) for layer in layers)
    if expected is not None:
        names = {id(m): n.replace(".base_layer", "") for n, m in transformer.named_modules()}
        for layer in layers:
            want = expected[names[id(layer)] + ".weight"].to(layer.weight.device).float()
            got = layer.weight.dequantize().float()
            assert float((got - want).norm() / want.norm()) < 0.1, names[id(layer)]
    return len(layers)


@needs_fp8
@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_replica_renders_near_bf16_and_refreshes_land_quantized(fp8_setup, compiled):
    s = fp8_setup
    plain = _replica(s)
    fp8 = _replica(s, quantize="fp8", compile=compiled)
    assert fp8.startup["fp8_layers"] == _check_quantized(fp8) > 0
    before = {"plain": plain.render([s["request"]]), "fp8": fp8.render([s["request"]])}
    graphs = fp8.compiled_graphs()

    # a full update: copied into plain weights, quantized again, each layer checked against what was loaded
    for gen in (plain, fp8):
        gen.load_weights(*in_memory_update(1, s["full"], "full"))
    _check_quantized(fp8, dict(s["full"]))
    full = {"plain": plain.render([s["request"]]), "fp8": fp8.render([s["request"]])}
    moved = _levels(full["plain"], before["plain"])  # what the new weights change, in bf16
    assert moved > 1.0
    assert _levels(full["fp8"], full["plain"]) < moved / 4  # the FP8 replica has the new weights, not the old
    assert _levels(before["fp8"], before["plain"]) < moved / 4
    if compiled:
        assert fp8.compiled_graphs() == graphs  # new FP8 weights in the same structure: no recompilation

    # a LoRA update: the adapter runs beside the FP8 base layers
    for gen in (plain, fp8):
        gen.load_weights(*in_memory_update(2, s["lora"], "lora", LORA))
    _check_quantized(fp8)
    lora = {"plain": plain.render([s["request"]]), "fp8": fp8.render([s["request"]])}
    moved = _levels(lora["plain"], full["plain"])
    assert moved > 1.0
    assert _levels(lora["fp8"], lora["plain"]) < moved / 4
    assert fp8.weights_version == plain.weights_version == 2


@needs_fp8
def test_fp8_refused_refresh_leaves_the_replica_quantized(fp8_setup):
    s = fp8_setup
    fp8 = _replica(s, quantize="fp8")
    fp8.load_weights(*in_memory_update(1, s["full"], "full"))
    with pytest.raises(Exception, match="not newer"):
        fp8.load_weights(*in_memory_update(1, s["full"], "full"))  # an old version: refused before anything is copied
    _check_quantized(fp8, dict(s["full"]))
    with pytest.raises(ConfigError, match="bfloat16"):
        Generator(s["path"], ModelConfig(dtype="float32"), _cfg(device="cuda", quantize="fp8"), VideoConfig())
