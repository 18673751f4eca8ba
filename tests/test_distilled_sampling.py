"""A step-distilled checkpoint's sampling protocol (AniSora V3.1 / V3.2: 8 steps, flow shift 5, guidance 1) through
the real pipelines at tiny size: ``generator.flow_shift`` moves the replica's sampler and the GAPO worker's training
grid alike; guidance 1 calls the denoiser once per step (no CFG branch); ``gapo.timesteps: rollout`` noises pairs
only at the timesteps a rollout calls the denoiser at, each routed to the expert the pipeline used there."""

from __future__ import annotations

import numpy as np
import torch

from anisora_ray.data.manifest import read_manifest
from anisora_ray.gapo.models import load_transformer_pipeline
from anisora_ray.models.families import get_family
from anisora_ray.models.objectives import expert_index
from anisora_ray.models.pipeline import resolve_pretrained
from anisora_ray.types import GenerationRequest

WAN, COG = get_family("wan_i2v"), get_family("cogvideox_i2v")


def denoiser_calls(generator, request) -> tuple[np.ndarray, list[tuple[int, float]]]:
    """Render ``request`` and list the (expert, timestep) of every denoiser call the pipeline made."""
    pipe, calls, handles = generator.pipe, [], []
    for expert, module in enumerate(m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None):
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, kw, e=expert: calls.append((e, float(kw["timestep"].flatten().max()))), with_kwargs=True))
    try:
        return generator.render([request]), calls
    finally:
        for h in handles:
            h.remove()


def test_the_distilled_protocol_samples_without_cfg_at_its_shift_and_trains_at_its_steps(make_config, demo_manifest):
    from anisora_ray.generation.generator import Generator

    protocol = ["generator.num_inference_steps=8", "generator.guidance_scale=1", "gapo.timesteps=rollout"]
    base = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b", *protocol)
    shifted = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b", *protocol,
                          "generator.flow_shift=5")
    path = resolve_pretrained(shifted.model, shifted.generator)
    request = GenerationRequest(read_manifest(demo_manifest)[0], (3,))
    replica = Generator(path, shifted.model, shifted.generator, shifted.video)
    assert replica.pipe.scheduler.config.flow_shift == 5.0
    video, calls = denoiser_calls(replica, request)
    assert len(calls) == 8  # one call per step: no unconditional branch
    unshifted, base_calls = denoiser_calls(Generator(path, base.model, base.generator, base.video), request)
    assert len(base_calls) == 8 and [t for _, t in base_calls] != [t for _, t in calls]  # the shift moves the steps
    assert not np.array_equal(video, unshifted)
    with_cfg = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan22_i2v_a14b", *protocol[:1])
    assert len(denoiser_calls(Generator(path, with_cfg.model, with_cfg.generator, with_cfg.video), request)[1]) == 16

    # the GAPO worker's pipeline: the replica's sampler, so its rollout timesteps are the ones just called
    trainer = load_transformer_pipeline(path, shifted, "cpu")
    assert trainer.scheduler.config.flow_shift == 5.0
    pool = WAN.rollout_timesteps(trainer, shifted.generator.num_inference_steps)
    assert pool.tolist() == [t for _, t in calls]
    used_by = {t: e for e, t in calls}  # the expert the pipeline called at each timestep
    assert set(used_by.values()) == {0, 1}
    experts = []
    for i in range(300):
        draw = WAN.draw(trainer, (2, 4, 3, 4, 4), torch.Generator().manual_seed(i),
                        torch.Generator().manual_seed(10**6 + i), timesteps=pool)
        assert all(float(t) in used_by for t in draw.timesteps)  # only the rollout's timesteps
        assert {used_by[float(t)] for t in draw.timesteps} == {draw.expert}  # each trains the expert used there
        assert torch.allclose(draw.sigmas, draw.timesteps / 1000)
        experts.append(draw.expert)
    share = sum(e for e in used_by.values()) / len(used_by)  # the low-noise expert's share of the steps
    assert abs(np.mean(experts) - share) < 0.08
    uniform = WAN.draw(trainer, (64, 4, 3, 4, 4), torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    assert len(set(uniform.timesteps.tolist()) - set(used_by)) > 32  # without a pool: the whole training grid
    assert (expert_index(uniform.timesteps, trainer.config.boundary_ratio) == uniform.expert).all()


def test_cogvideox_trains_at_the_timesteps_its_sampler_calls(make_config, demo_manifest):
    """The same pool for CogVideoX's DDIM and its DPM solver (``generator.scheduler``): the rollout's timesteps,
    CFG's two halves in one call per step; without a pool the draw is the DDPM grid, as before."""
    from anisora_ray.generation.generator import Generator

    request = GenerationRequest(read_manifest(demo_manifest)[0], (2,))
    for sampler in ("pretrained", "dpm"):
        cfg = make_config(f"generator.scheduler={sampler}", "generator.num_inference_steps=6", "gapo.timesteps=rollout")
        path = resolve_pretrained(cfg.model, cfg.generator)
        _, calls = denoiser_calls(Generator(path, cfg.model, cfg.generator, cfg.video), request)
        trainer = load_transformer_pipeline(path, cfg, "cpu")
        pool = COG.rollout_timesteps(trainer, 6)
        assert pool.tolist() == [t for _, t in calls] and len(calls) == 6
        drawn = COG.draw(trainer, (200, 2, 4, 4, 4), torch.Generator().manual_seed(0), timesteps=pool).timesteps
        assert set(drawn.tolist()) == set(pool.tolist())
    grid = COG.draw(trainer, (200, 2, 4, 4, 4), torch.Generator().manual_seed(0)).timesteps
    same = torch.Generator().manual_seed(0)
    torch.randn((200, 2, 4, 4, 4), generator=same)  # the draw's noise comes first
    assert grid.tolist() == torch.randint(0, 1000, (200,), generator=same).tolist()  # uniform over the DDPM grid


def test_a_prompt_suffix_conditions_rollouts_and_training_alike_and_stays_out_of_the_records(make_config, demo_manifest,
                                                                                          tmp_path):
    """``generator.prompt_suffix`` (AniSora V3.x's control codes): the replica renders prompt + suffix, the GAPO
    worker's pair encoder embeds the same text, and the candidates' records (what rewards score) keep the prompt."""
    from anisora_ray.gapo.batches import PairEncoder
    from anisora_ray.gapo.models import Encoders
    from anisora_ray.generation.generator import Generator

    suffix = " aesthetic score: 5.5. motion score: 3.0. There is no text in the video."
    cfg = make_config("model.family=wan_i2v", "model.tiny.wan_variant=wan21_i2v", f"generator.prompt_suffix={suffix!r}")
    g, path = cfg.generator, resolve_pretrained(cfg.model, cfg.generator)
    assert g.prompt_suffix == suffix
    replica, item = Generator(path, cfg.model, g, cfg.video), read_manifest(demo_manifest)[0]
    fed = []
    replica.pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: fed.append(kw["encoder_hidden_states"][0]),
                                                       with_kwargs=True)
    candidates, quarantined = replica.generate([GenerationRequest(item, (4, 5))], str(tmp_path / "videos"))
    assert not quarantined and [c.prompt for c in candidates] == [item.prompt] * 2  # the reward's text: no suffix
    encoder = PairEncoder(Encoders(path, cfg, "cpu"), WAN, path, g.height, g.width, g.num_frames,
                          WAN.text_length(replica.pipe, g), None, "cpu", g.prompt_suffix)
    w, lo = candidates
    row = {"prompt": item.prompt, "image_uri": item.image_uri, "winner_video_uri": w.video_uri, "loser_video_uri": lo.video_uri,
           "winner_reward": 0.9, "loser_reward": 0.1, "winner_seed": 4, "loser_seed": 5}
    trained = encoder.batch([row]).prompt_embeds[0]
    torch.testing.assert_close(trained, fed[0], rtol=0, atol=0)  # GAPO conditions on what the rollout rendered
    assert not torch.equal(encoder.prompt(item.prompt), trained)  # and the suffix is part of it
