"""generator.offload: model — every component rests on the host and runs on the replica's device (diffusers'
model offload). It renders what a resident replica renders, step caches keep working call after call (their hooks
sit under accelerate's, which are taken off and put back at every call's end), a full or LoRA refresh lands, a
failed call leaves the replica usable, and the combinations it cannot serve are refused at config load. On a GPU
(skipped elsewhere, with the reason): the components are on the host between calls and the peak memory is lower."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from anisora_ray.config import GeneratorConfig, LoraConfig
from anisora_ray.data.manifest import read_manifest
from anisora_ray.generation.generator import Generator
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.types import GenerationRequest
from anisora_ray.weights import lora as lora_io
from anisora_ray.weights.update import base_targets
from tests.conftest import in_memory_update

LORA = LoraConfig(r=2, alpha=4, target_modules=["to_q", "to_v"])
FAMILIES = {"cogvideox_i2v": ["model.family=cogvideox_i2v"],
            "wan22_i2v_a14b": ["model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b"]}
CACHES = {"cogvideox_i2v": ["generator.cache.kind=faster_cache"],  # a hook on the transformer itself, as accelerate's
          "wan22_i2v_a14b": ["generator.cache.kind=taylorseer", "generator.cache.warmup_steps=1",
                             "generator.cache.compute_every=3"]}  # hooks on the attention modules


def _replica(cfg, **generator) -> Generator:
    g = cfg.generator.model_copy(update=generator)
    return Generator(resolve_pretrained(cfg.model, cfg.generator), cfg.model, g, cfg.video)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_offloaded_replica_renders_as_a_resident_one_with_its_cache_and_after_refreshes(make_config, demo_manifest,
                                                                                          family):
    cfg = make_config(*FAMILIES[family], *CACHES[family], "generator.num_inference_steps=8")
    items = read_manifest(demo_manifest)
    requests = [GenerationRequest(items[0], (1, 2)), GenerationRequest(items[1], (3,))]
    resident, offloaded = _replica(cfg), _replica(cfg, offload="model")
    pipe = offloaded.pipe
    components = {id(m) for m in pipe.components.values() if isinstance(m, torch.nn.Module)}
    assert len(pipe._all_hooks) == len(components) and pipe._offload_device.type == offloaded.execution_device.type
    assert not hasattr(resident.pipe, "_all_hooks") or not resident.pipe._all_hooks

    first = resident.render(requests)
    uncached = resident.render(requests, exact=True)
    assert np.abs(first.astype(int) - uncached).max() > 0  # the cache predicts some steps: it is in use
    for _ in range(2):  # the second call too: the cache's hooks outlive accelerate's being taken off and put back
        np.testing.assert_array_equal(offloaded.render(requests), first)
        assert len(pipe._all_hooks) == len(components)
    np.testing.assert_array_equal(offloaded.render(requests, exact=True), uncached)

    g = torch.Generator().manual_seed(0)
    full = sorted((k, v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype))
                  for k, v in base_targets(resident.receiving_module()).items())
    donor = _replica(cfg).receiving_module()
    lora_io.add_adapter(donor, LORA)
    lora = sorted((k, torch.randn(v.shape, generator=g) * 0.5) for k, v in lora_io.adapter_state(donor).items())
    previous = first
    for version, update in ((1, in_memory_update(1, full, "full")), (2, in_memory_update(2, lora, "lora", LORA))):
        for replica in (resident, offloaded):
            replica.load_weights(*update)
        after = resident.render(requests)
        assert not np.array_equal(after, previous)  # the update changes the videos ...
        np.testing.assert_array_equal(offloaded.render(requests), after)  # ... and the offloaded replica has it
        assert offloaded.weights_version == version
        previous = after


def test_a_failed_call_leaves_an_offloaded_replica_hooked_and_rendering(make_config, demo_manifest):
    cfg = make_config(*FAMILIES["wan22_i2v_a14b"], "generator.num_inference_steps=2")
    items = read_manifest(demo_manifest)
    replica = _replica(cfg, offload="model")
    request = [GenerationRequest(items[0], (4,))]
    expected = replica.render(request)
    hooks = len(replica.pipe._all_hooks)
    with pytest.raises(ValueError, match="list of generators"):
        _fail_after_the_text_encoder(replica)
    assert len(replica.pipe._all_hooks) == hooks
    np.testing.assert_array_equal(replica.render(request), expected)


def _fail_after_the_text_encoder(replica: Generator) -> None:
    """A call that fails inside the pipeline once the text encoder has run: one noise generator for two videos."""
    image = Image.new("RGB", (replica.cfg.width, replica.cfg.height))
    replica._run([image, image], ["a", "b"], [torch.Generator(replica.execution_device).manual_seed(0)])


def test_offload_refuses_what_it_cannot_serve():
    GeneratorConfig(offload="model", compile=True, compile_mode="max-autotune-no-cudagraphs")  # accepted
    with pytest.raises(ValidationError, match="offload='model' with generator.quantize='fp8'"):
        GeneratorConfig(offload="model", quantize="fp8")
    with pytest.raises(ValidationError, match="CUDA graphs keep the weights' GPU addresses"):
        GeneratorConfig(offload="model", compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValidationError, match="offload"):
        GeneratorConfig(offload="sequential")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves weights to a GPU: no CUDA device")
def test_on_a_gpu_the_components_rest_on_the_host_the_peak_is_lower_and_nothing_recompiles(make_config, demo_manifest):
    cfg = make_config(*FAMILIES["wan22_i2v_a14b"], "generator.num_inference_steps=2", "generator.device=cuda",
                      "model.tiny.num_layers=4")
    request = [GenerationRequest(read_manifest(demo_manifest)[0], (1, 2))]
    peaks, frames = {}, {}
    for mode, compiled in (("none", False), ("model", False), ("model", True)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        replica = _replica(cfg, offload=mode, compile=compiled)
        assert replica.compute_device().index is not None  # a broadcast group sets it: torch needs the index
        graphs = replica.compiled_graphs()
        frames[mode, compiled] = replica.render(request)
        peaks[mode, compiled] = torch.cuda.max_memory_allocated() - base
        if mode == "model":  # a failed call puts the text encoder back on the host as well
            with pytest.raises(ValueError, match="list of generators"):
                _fail_after_the_text_encoder(replica)
            np.testing.assert_array_equal(replica.render(request), frames[mode, compiled])
            assert replica.compiled_graphs() == graphs  # weights moved up and back between calls: no recompilation
        on_gpu = {name for name, m in replica.pipe.components.items()
                  if isinstance(m, torch.nn.Module) and any(p.is_cuda for p in m.parameters())}
        assert on_gpu == (set() if mode == "model" else {n for n, m in replica.pipe.components.items()
                                                         if isinstance(m, torch.nn.Module)}), (mode, on_gpu)
        del replica
    assert peaks["model", False] < peaks["none", False], peaks
    assert np.abs(frames["model", False].astype(int) - frames["none", False]).max() <= 1
