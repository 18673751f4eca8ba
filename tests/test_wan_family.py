"""The Wan family (``model.family: wan_i2v``) at tiny size, through the real ``WanImageToVideoPipeline``: the three
released structures build, load and render per seed; training conditions exactly as the pipeline conditioned the
rollout; the flow-matching error equals a hand computation with TI2V's given first frame masked out; two experts
train the expert the pipeline uses at each σ; GAPO updates lower the loss, and so do the Diffusion-DPO and SFT
ablations."""

from __future__ import annotations

import math
import os
import re

import numpy as np
import pytest
import torch

from anisora_ray.data.manifest import read_manifest
from anisora_ray.gapo.diffusion import PairLatents, gapo_step
from anisora_ray.models.families import NoiseDraw, get_family
from anisora_ray.models.objectives import expert_index
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.types import GenerationRequest
from tests.conftest import gapo_child_script

WAN = get_family("wan_i2v")
VARIANTS = ("wan21_i2v", "wan22_ti2v", "wan22_i2v_a14b")


def wan_config(make_config, variant: str, *more: str):
    return make_config("model.family=wan_i2v", f"model.tiny.wan_variant={variant}", *more)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_released_structure_builds_loads_and_renders_per_seed(make_config, demo_manifest, variant):
    from anisora_ray.generation.generator import Generator

    cfg = wan_config(make_config, variant)
    path = resolve_pretrained(cfg.model, cfg.generator)
    assert os.path.basename(path).startswith("tiny-wan-i2v-")
    files = {os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs}
    assert "transformer/diffusion_pytorch_model.safetensors" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)  # safetensors only
    gen = Generator(path, cfg.model, cfg.generator, cfg.video)
    pipe = gen.pipe
    assert type(pipe).__name__ == "WanImageToVideoPipeline"
    assert (pipe.image_encoder is not None) == (variant == "wan21_i2v")
    assert pipe.config.expand_timesteps == (variant == "wan22_ti2v")
    assert (pipe.transformer_2 is not None) == (pipe.config.boundary_ratio is not None) == (variant == "wan22_i2v_a14b")
    items = read_manifest(demo_manifest)
    both = gen.render([GenerationRequest(items[0], (1, 2)), GenerationRequest(items[1], (1,))])
    assert both.shape == (3, 9, 32, 32, 3) and both.dtype == np.uint8
    np.testing.assert_array_equal(gen.render([GenerationRequest(items[1], (1,))])[0], both[2])  # its own seed only
    np.testing.assert_array_equal(gen.render([GenerationRequest(items[0], (1, 2))]), both[:2])
    assert not np.array_equal(both[0], both[1])  # distinct seeds, distinct videos


@pytest.mark.parametrize("family", ("cogvideox_i2v", "wan_i2v"))
def test_the_negative_prompt_conditions_cfgs_other_branch_and_needs_cfg(make_config, demo_manifest, family):
    """``generator.negative_prompt`` (the Wan configs set Wan's, which its sampler substitutes for an empty one): the
    same seed renders another video with it; without CFG nothing would read it, so the config refuses it."""
    from anisora_ray.errors import ConfigError
    from anisora_ray.generation.generator import Generator

    request = [GenerationRequest(read_manifest(demo_manifest)[0], (4,))]
    videos = []
    for negative in ("", "blurry, static, low quality", "blurry, static, low quality"):
        cfg = make_config(f"model.family={family}", f"generator.negative_prompt={negative}")
        videos.append(Generator(resolve_pretrained(cfg.model, cfg.generator), cfg.model, cfg.generator,
                                cfg.video).render(request))
    assert cfg.generator.guidance_scale > 1 and not np.array_equal(videos[0], videos[1])
    np.testing.assert_array_equal(videos[1], videos[2])
    with pytest.raises(ConfigError, match="negative_prompt is set and guidance_scale=1.0"):
        make_config(f"model.family={family}", "generator.guidance_scale=1", "generator.negative_prompt=blurry")


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_conditions_exactly_as_the_pipeline_conditioned_the_rollout(make_config, demo_manifest, variant):
    """What the GAPO worker feeds the transformer besides the noisy latents (condition channels or the given first
    frame, CLIP image tokens, prompt embeddings) equals what the pipeline fed it when it rendered the video."""
    from anisora_ray.gapo.batches import PairEncoder
    from anisora_ray.gapo.models import Encoders
    from anisora_ray.generation.generator import Generator

    cfg = wan_config(make_config, variant)
    g, path = cfg.generator, resolve_pretrained(cfg.model, cfg.generator)
    rollout = Generator(path, cfg.model, g, cfg.video)
    seen = []
    rollout.pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw), with_kwargs=True)
    item = read_manifest(demo_manifest)[0]
    rollout.render([GenerationRequest(item, (11,))])
    fed = seen[0]  # the conditional call of the first step

    encoder = PairEncoder(Encoders(path, cfg, "cpu"), WAN, path, g.height, g.width, g.num_frames,
                          WAN.text_length(rollout.pipe, g))
    condition = encoder.condition(item.image_uri, 11)
    assert encoder.condition(item.image_uri, 12).keys() == condition.keys()  # argmax posterior: the seed is irrelevant
    torch.testing.assert_close(encoder.prompt(item.prompt), fed["encoder_hidden_states"][0], rtol=0, atol=0)
    z = rollout.pipe.vae.config.z_dim
    if variant == "wan22_ti2v":  # the first latent frame is the image's latents, its tokens at timestep 0
        torch.testing.assert_close(fed["hidden_states"][0, :, :1], condition["condition"], rtol=0, atol=0)
        tokens_per_frame = fed["timestep"].shape[1] // fed["hidden_states"].shape[2]
        assert torch.all(fed["timestep"][0, :tokens_per_frame] == 0) and torch.all(fed["timestep"][0, tokens_per_frame:] > 0)
    else:  # mask and image latents concatenated on channels
        torch.testing.assert_close(fed["hidden_states"][0, z:], condition["condition"], rtol=0, atol=0)
    if variant == "wan21_i2v":
        torch.testing.assert_close(fed["encoder_hidden_states_image"][0], condition["image_embeds"], rtol=0, atol=0)
    else:
        assert "image_embeds" not in condition and fed.get("encoder_hidden_states_image") is None


class Fixed(torch.nn.Module):
    """A 'model' that returns a given prediction and records its inputs."""

    dtype = torch.float32

    def __init__(self, prediction):
        super().__init__()
        self.prediction, self.seen = prediction, {}

    def forward(self, **kwargs):
        self.seen = kwargs
        return (self.prediction,)


@pytest.mark.parametrize("variant", ["wan22_ti2v", "wan21_i2v"])
def test_the_flow_error_equals_a_hand_computation_and_leaves_out_the_given_first_frame(make_config, variant):
    cfg = wan_config(make_config, variant)
    pipe = WAN.load(resolve_pretrained(cfg.model, cfg.generator), "float32", "cpu", None, "trainer")
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 3, 4, 4)  # [B, C, F', h, w]: the test size's latents
    x0, noise, prediction = (torch.randn(shape, generator=g) for _ in range(3))
    sigmas = torch.tensor([0.3, 0.9])
    draw = NoiseDraw(noise, sigmas * 1000, sigmas)
    if variant == "wan22_ti2v":
        condition = {"condition": torch.randn((2, 4, 1, 4, 4), generator=g)}
    else:
        condition = {"condition": torch.randn((2, 4 + 4, 3, 4, 4), generator=g)}  # mask (4: the VAE's time factor) + latents
    model = Fixed(prediction)
    got = WAN.errors(pipe, model, x0, condition, torch.zeros(2, 5, 32), draw)
    s = sigmas.view(2, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    squared = (prediction - (noise - x0)) ** 2
    fed = model.seen["hidden_states"]
    if variant == "wan22_ti2v":
        expected = squared[:, :, 1:].flatten(1).mean(1)  # frames 1.. only: frame 0 is the image, given
        torch.testing.assert_close(fed[:, :, :1], condition["condition"])
        torch.testing.assert_close(fed[:, :, 1:], x_t[:, :, 1:])
        per_frame = model.seen["timestep"].view(2, 3, -1)  # per token: 0 on the given frame, σ·N elsewhere
        assert torch.all(per_frame[:, 0] == 0) and torch.allclose(per_frame[:, 1:], (sigmas * 1000).view(2, 1, 1).expand(2, 2, 4))
        moved = prediction.clone()
        moved[:, :, 0] += 100.0  # what the model says about the given frame does not count
        torch.testing.assert_close(WAN.errors(pipe, Fixed(moved), x0, condition, torch.zeros(2, 5, 32), draw), got)
    else:
        expected = squared.flatten(1).mean(1)  # Wan2.1 / A14B generate every frame, the first included
        torch.testing.assert_close(fed, torch.cat([x_t, condition["condition"]], dim=1))
        torch.testing.assert_close(model.seen["timestep"], sigmas * 1000)
    torch.testing.assert_close(got, expected)


def test_two_experts_train_the_expert_the_pipeline_uses_at_each_sigma(make_config, demo_manifest):
    from anisora_ray.generation.generator import Generator

    cfg = wan_config(make_config, "wan22_i2v_a14b", "generator.num_inference_steps=12")
    path = resolve_pretrained(cfg.model, cfg.generator)
    rollout = Generator(path, cfg.model, cfg.generator, cfg.video)
    pipe, boundary = rollout.pipe, rollout.pipe.config.boundary_ratio
    used = []  # (expert, timestep) of every transformer call the pipeline makes
    for expert, module in enumerate((pipe.transformer, pipe.transformer_2)):
        module.register_forward_pre_hook(lambda _m, _a, kw, e=expert: used.append((e, float(kw["timestep"][0]))),
                                         with_kwargs=True)
    rollout.render([GenerationRequest(read_manifest(demo_manifest)[0], (3,))])
    assert {e for e, _ in used} == {0, 1}  # both experts generate
    assert [e for e, _ in used] == expert_index(torch.tensor([t for _, t in used]), boundary).tolist()

    trainer = WAN.load(path, "float32", "cpu", None, "trainer")
    experts = []
    for i in range(400):
        draw = WAN.draw(trainer, (2, 4, 3, 4, 4), torch.Generator().manual_seed(i), torch.Generator().manual_seed(10**6 + i))
        assert expert_index(draw.timesteps, boundary).tolist() == [draw.expert] * 2  # routed as the pipeline would
        experts.append(draw.expert)
    shift = trainer.scheduler.config.flow_shift
    s = boundary / (shift - (shift - 1) * boundary)  # grid fraction below the boundary: σ' = shift·s/(1+(shift−1)s)
    assert abs(np.mean(experts) - s) < 0.07  # each expert trains as often as its share of the training grid

    module = WAN.trained_module(trainer)
    assert WAN.trained_module(trainer) is module and sorted(n.split(".")[0] for n, _ in module.named_children()) == [
        "transformer", "transformer_2"]
    calls = []
    for expert, part in enumerate((module.transformer, module.transformer_2)):
        part.register_forward_pre_hook(lambda *_a, e=expert: calls.append(e))
    condition = {"condition": torch.zeros((1, 8, 3, 4, 4))}  # mask (4: the VAE's time factor) + z
    for expert in (0, 1):
        WAN.errors(trainer, module, torch.zeros(1, 4, 3, 4, 4), condition, torch.zeros(1, 8, 32),
                   NoiseDraw(torch.zeros(1, 4, 3, 4, 4), torch.tensor([500.0]), torch.tensor([0.5]), expert))
    assert calls == [0, 1]


def random_pair(pipe, seed: int) -> PairLatents:
    """Two random 9x32x32 clips as one pair: winner (reward 0.9) and loser (0.2), the winner's first frame the image."""
    from PIL import Image

    videos = np.random.default_rng(seed).integers(0, 255, (2, 9, 32, 32, 3), dtype=np.uint8)
    winner, loser = (WAN.encode_video(pipe, v)[None] for v in videos)
    condition = WAN.encode_condition(pipe, Image.fromarray(videos[0, 0]), 0, 32, 32, 9)
    return PairLatents(winner, loser, {k: v[None] for k, v in condition.items()},
                       WAN.encode_prompt(pipe, "a girl waves", 128)[None], torch.tensor([0.9]), torch.tensor([0.2]))


def test_gapo_updates_on_a_tiny_wan_with_lora_on_both_experts_lower_the_loss(make_config):
    from anisora_ray.config import LoraConfig
    from anisora_ray.gapo.models import FrozenReference
    from anisora_ray.weights import lora as lora_io

    cfg = wan_config(make_config, "wan22_i2v_a14b")
    path = resolve_pretrained(cfg.model, cfg.generator)
    pipe = WAN.load(path, "float32", "cpu", None, "all")
    batch = random_pair(pipe, 0)
    policy = WAN.trained_module(pipe)
    lora_io.add_adapter(policy, LoraConfig(r=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    names = list(lora_io.adapter_state(policy))
    assert any(n.startswith("transformer.") for n in names) and any(n.startswith("transformer_2.") for n in names)
    trained = [p for n, p in policy.named_parameters() if f".{lora_io.ADAPTER}." in n]
    for p in policy.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    reference = FrozenReference(policy, torch.float32, adapter_off=True)
    optimizer = torch.optim.Adam(trained, lr=1e-2)
    shared_seed = {}  # a shared seed that trains each expert
    for seed in range(100):
        shared_seed.setdefault(WAN.draw(pipe, (1, 4, 3, 4, 4), torch.Generator(), torch.Generator().manual_seed(seed)).expert, seed)
    losses = {0: [], 1: []}
    for step in range(12):
        expert = step % 2  # alternate the experts: both learn
        out = gapo_step(WAN, pipe, policy, reference, batch, torch.Generator().manual_seed(5),
                        shared=torch.Generator().manual_seed(shared_seed[expert]), beta=50.0)
        losses[expert].append(float(out.loss.detach()))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    start = (2**0.9 - 2**0.2) * math.log(2)  # policy == reference: margin 0, DPO term log 2
    for expert, seq in losses.items():
        assert seq[0] == pytest.approx(start, rel=1e-5) and seq[-1] < seq[0] * 0.95, (expert, seq)


def test_the_diffusion_dpo_and_sft_ablations_train_a_tiny_wan(make_config):
    """The paper's baselines on the flow objective: Diffusion-DPO is GAPO without the gain (log 2 at policy ==
    reference, whatever the rewards), SFT is the winner's masked flow error alone; each lowers its loss."""
    import copy
    import dataclasses

    from anisora_ray.gapo.diffusion import draw_for, pair_errors, sft_step
    from anisora_ray.gapo.models import FrozenReference

    cfg = wan_config(make_config, "wan22_ti2v")
    pipe = WAN.load(resolve_pretrained(cfg.model, cfg.generator), "float32", "cpu", None, "all")
    batch = random_pair(pipe, 1)

    def seeds():
        return torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)

    losses = {}
    for name in ("dpo", "sft"):
        torch.manual_seed(0)
        policy = copy.deepcopy(WAN.trained_module(pipe)).requires_grad_(True)
        reference = FrozenReference(copy.deepcopy(policy).requires_grad_(False), torch.float32)
        optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(6):
            generator, shared = seeds()
            if name == "dpo":
                out = gapo_step(WAN, pipe, policy, reference, batch, generator, shared=shared, beta=50.0, use_gain=False)
            else:
                out = sft_step(WAN, pipe, policy, batch, generator, shared)
            losses[name].append(float(out.loss.detach()))
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
        if name == "sft":  # after training: the loss is the winner's error, and the given first frame is not in it
            with torch.no_grad():
                generator, shared = seeds()
                err_w, err_l = pair_errors(WAN, pipe, policy, batch, draw_for(WAN, pipe, batch, generator, shared))
                got = float(sft_step(WAN, pipe, policy, batch, *seeds()).loss)
                moved = dataclasses.replace(batch, winner=batch.winner.clone())
                moved.winner[:, :, 0] += 10.0
                unmoved = float(sft_step(WAN, pipe, policy, moved, *seeds()).loss)
            assert got == pytest.approx(float(err_w.mean()), rel=1e-6) and abs(got - float(err_l.mean())) > 1e-4
            assert unmoved == pytest.approx(got, rel=1e-6)
    assert losses["dpo"][0] == pytest.approx(math.log(2), rel=1e-5)  # no gain factor: GAPO's would be 0.60
    for name, seq in losses.items():
        assert seq[-1] < seq[0] * 0.98, (name, seq)


CHILD = gapo_child_script(29591, """
import deepspeed

def snapshot(module, trained_only=False):
    # name -> a copy of each (trained) parameter, whole: ZeRO-3 keeps only a slice in place
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trained_only]
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=hasattr(params[0][1], "ds_id")):
        return {n: p.detach().clone() for n, p in params}

cases = arg
result = {}
for name, overrides in cases.items():
    cfg = load_config(config, overrides)
    worker = GapoWorker(cfg, resolve_pretrained(cfg.model, cfg.generator), deepspeed_config(cfg, root), torch.device("cpu"))
    worker.prepare([row])
    seen = set()  # every timestep the trained module (policy and reference) was called at
    worker.engine.module.register_forward_pre_hook(
        lambda _m, _a, kw: seen.update(float(t) for t in kw["timestep"].flatten()), with_kwargs=True)
    metrics, moved = [], []  # per update: the top-level modules whose trained parameters changed
    start = snapshot(worker.engine.module)
    for _ in range(cfg.gapo.steps):
        before = snapshot(worker.engine.module, trained_only=True)
        metrics.append(worker.train_update())
        now = snapshot(worker.engine.module)
        moved.append(sorted({n.split(".")[0] for n, t in before.items() if not torch.equal(t, now[n])}))
    manifest = worker.export(f"{out}/{name}", 64.0)
    trainable = {n for n, p in worker.engine.module.named_parameters() if p.requires_grad}
    result[name] = {"uri": f"{out}/{name}", "loss": [m["loss"] for m in metrics], "kind": manifest["kind"],
                    "num_tensors": manifest["num_tensors"], "timesteps": sorted(seen), "moved": moved,
                    "trainable": sorted(trainable), "zero_stage": worker.engine.zero_optimization_stage(),
                    "base_moved": sorted(n for n, t in start.items() if ".lora_" not in n and not torch.equal(t, now[n]))}
    for latents in worker.encoder.memory.values():  # a diverged model: its errors, so the loss, are NaN
        for t in latents.values():
            t.fill_(float("nan"))
    try:
        worker.train_update()
    except FloatingPointError as exc:
        result[name]["nan_error"] = str(exc)
print("RESULT " + json.dumps(result))
""")


def test_gapo_trains_wan_under_deepspeed_and_a_refresh_reaches_a_wan_replica_bit_for_bit(tmp_path, model_cache,
                                                                                          demo_manifest):
    """GapoWorker (DeepSpeed, gloo, world size 1) on the tiny Wan: LoRA on both A14B experts and full fine-tuning of
    TI2V (ZeRO-2), both A14B experts fully fine-tuned under ZeRO-3 with a partitioned reference (AniSora V3.2's
    setting); each exported folder loads into a Wan replica exactly, and the replica renders anew."""
    import json
    import subprocess
    import sys

    from anisora_ray.config import load_config
    from anisora_ray.generation.generator import Generator
    from anisora_ray.weights.update import folder_update, read_folder
    from tests.conftest import LOCAL_CONFIG, REPO, config_overrides

    base = [*config_overrides(tmp_path, model_cache), "model.family=wan_i2v", "gapo.steps=3", "gapo.beta=50",
            "gapo.deepspeed_config=configs/deepspeed/zero2.json"]
    cases = {
        # AniSora V3.2's protocol: a step-distilled A14B sampled at its shift without CFG, trained at those steps
        # AdamW with weight decay: an update that trains one expert leaves the other where it is
        "a14b_lora": [*base, "model.tiny.wan_variant=wan22_i2v_a14b", "gapo.learning_rate=1e-2", "gapo.steps=6",
                      "gapo.deepspeed_overrides={optimizer: {params: {weight_decay: 0.1}}}",
                      "gapo.lora={r: 4, alpha: 4, target_modules: [to_q, to_k, to_v, to_out.0]}",
                      "generator.flow_shift=5", "generator.guidance_scale=1", "gapo.timesteps=rollout"],
        "ti2v_full": [*base, "model.tiny.wan_variant=wan22_ti2v", "gapo.learning_rate=1e-3"],
        # AniSora V3.2's own training: both experts fully fine-tuned under ZeRO-3 (AdamW state on the host), the
        # frozen reference partitioned (one update a micro-batch, so each update trains one expert)
        "a14b_full_zero3": [*base, "model.tiny.wan_variant=wan22_i2v_a14b", "gapo.learning_rate=1e-2", "gapo.steps=10",
                            "gapo.deepspeed_config=configs/deepspeed/zero3_offload.json", "gapo.reference=partitioned",
                            "gapo.deepspeed_overrides={gradient_accumulation_steps: 1}",
                            "generator.flow_shift=5", "generator.guidance_scale=1", "gapo.timesteps=rollout"],
    }
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), LOCAL_CONFIG, REPO, json.dumps(cases)],
                          check=False, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    item = read_manifest(demo_manifest)[0]
    for name, overrides in cases.items():
        trained = result[name]
        assert all(np.isfinite(trained["loss"])), trained
        # a non-finite loss stops the update before its gradients reach the weights, naming the pairs
        assert re.search(r"update \d+, micro-batch \d+: loss nan is not finite \(pairs \['", trained.get("nan_error", "")), name
        if "lora" in name:  # only the adapter trains: the base (also the reference, the adapter switched off) stays
            assert trained["trainable"] and all(".lora_" in n for n in trained["trainable"]), trained["trainable"][:5]
            assert trained["base_moved"] == [], trained["base_moved"][:5]
        else:
            assert trained["base_moved"], name
        if "zero3" in name:  # the experts trained: the pair's loss fell once WarmupLR's rate rose above 0
            assert trained["zero_stage"] == 3 and min(trained["loss"][4:]) < trained["loss"][0] - 0.05, trained["loss"]
        cfg = load_config(LOCAL_CONFIG, overrides)
        replica = Generator(resolve_pretrained(cfg.model, cfg.generator), cfg.model, cfg.generator, cfg.video)
        called = []  # the timesteps the replica's denoisers are called at
        for m in (replica.pipe.transformer, replica.pipe.transformer_2):
            if m is not None:
                m.register_forward_pre_hook(lambda _m, _a, kw: called.append(float(kw["timestep"].max())),
                                            with_kwargs=True)
        before = replica.render([GenerationRequest(item, (5,))])
        if "a14b" in name:  # one call per step without CFG; GAPO noised the pair only at those timesteps
            assert len(called) == cfg.generator.num_inference_steps
            assert trained["timesteps"] and set(trained["timesteps"]) <= set(called), (trained["timesteps"], called)
            # each update (one micro-batch) moved the expert it trained only, also once both had momentum (an idle
            # expert's AdamW step once moved it by its momentum and weight decay)
            moved = [m for m in trained["moved"] if m]  # none moves while WarmupLR's rate is still 0
            assert all(len(m) == 1 for m in moved) and {m[0] for m in moved} == {"transformer", "transformer_2"}, moved
            first = {m[0]: i for i, m in reversed(list(enumerate(moved)))}
            assert any(i > max(first.values()) for i in range(len(moved))), moved  # after both had trained
        else:  # CFG: two calls per step; training draws from the whole grid
            assert len(called) == 2 * cfg.generator.num_inference_steps
        report = replica.load_weights_from(folder_update(trained["uri"], 1))
        assert replica.weights_version == 1 and report
        kind, _, tensors = read_folder(trained["uri"])
        tensors = dict(tensors)
        assert kind == trained["kind"] == ("lora" if "lora" in name else "full")
        module = replica.receiving_module()
        if kind == "lora":
            from anisora_ray.weights import lora as lora_io

            landed = {k: v.detach() for k, v in lora_io.adapter_state(module).items()}
            assert {k.split(".")[0] for k in landed} == {"transformer", "transformer_2"}  # both experts refreshed
        else:
            from anisora_ray.weights.update import base_targets

            landed = base_targets(module)
        assert set(landed) == set(tensors) and len(tensors) == trained["num_tensors"]
        assert all(torch.equal(landed[k], tensors[k]) for k in tensors)  # bit for bit
        assert not np.array_equal(replica.render([GenerationRequest(item, (5,))]), before)  # the new weights generate


def test_a_compiled_wan_replica_warms_up_the_batch_its_calls_render(make_config, demo_manifest):
    """Wan renders each request of a call apart (one image a pipeline call): with two prompts a call, the warm-up
    compiles batch K, not K x 2, so the first real call compiles nothing (it did, on the round's clock)."""
    from anisora_ray.generation.generator import Generator

    cfg = wan_config(make_config, "wan22_ti2v", "generator.compile=true", "generator.prompts_per_call=2",
                     "generator.candidates_per_prompt=2")
    gen = Generator(resolve_pretrained(cfg.model, cfg.generator), cfg.model, cfg.generator, cfg.video)
    graphs = gen.compiled_graphs()
    items = read_manifest(demo_manifest)
    gen.render([GenerationRequest(items[0], (1, 2)), GenerationRequest(items[1], (3, 4))])
    assert gen.compiled_graphs() == graphs
