"""The main job on the Wan family: ``align`` with a tiny two-expert Wan2.2-I2V-A14B (LoRA on both experts) sampled
with AniSora V3.2's step-distilled protocol (flow shift 5, no CFG, a control suffix on the prompts, GAPO at the
sampled timesteps) runs a round through the real Ray replicas, reward actors, Ray Train + DeepSpeed and the live
refresh (each replica verifies the adapter of both experts by checksum before it reports the version), then evaluates
on the new weights."""

from __future__ import annotations

import json

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides


def test_align_on_a_two_expert_wan_trains_refreshes_and_evaluates(ray_cluster, tmp_path, model_cache):
    from anisora_ray.config import load_config
    from anisora_ray.loop.align import run_alignment
    from anisora_ray.pairs.writer import read_pairs
    from anisora_ray.weights.update import read_folder

    overrides = [*config_overrides(tmp_path, model_cache), "model.family=wan_i2v",
                 "model.tiny.wan_variant=wan22_i2v_a14b", "loop.rounds=1", "gapo.steps=4", "gapo.beta=50",
                 "gapo.learning_rate=1e-2", "gapo.lora={r: 4, alpha: 4, target_modules: [to_q, to_k, to_v, to_out.0]}",
                 "generator.replicas=2", "eval.demo_prompts=2", "eval.candidates_per_prompt=1",
                 "eval.sample_videos=0", f"ray.address={ray_cluster.address}", "ray.log_to_driver=false",
                 "loop.registered_model=anisora-wan-test", "generator.flow_shift=5", "generator.guidance_scale=1",
                 "gapo.timesteps=rollout", "generator.prompt_suffix=' motion score: 3.0.'"]
    cfg = load_config(LOCAL_CONFIG, overrides)
    assert cfg.loop.refresh == "live"  # the trainer streams the adapter of both experts to the replicas
    result = run_alignment(cfg, progress=False, root=REPO)
    with open(result.state_uri) as f:
        state = json.load(f)
    assert [(r["index"], r["phase"], r["weights_version"]) for r in state["rounds"]] == [(1, "evaluated", 1)]
    pairs = read_pairs(str(tmp_path / "out" / "align" / "round-1" / "pairs"))
    assert len({p.prompt_id for p in pairs}) == len(pairs) > 0 and {p.weights_version for p in pairs} == {0}
    assert not any(p.prompt.endswith("motion score: 3.0.") for p in pairs)  # rendered with the suffix, scored without
    assert [row["round"] for row in result.rows] == [0, 1]
    assert all(0 <= row["heldout_reward"] <= 1 for row in result.rows)

    kind, _, tensors = read_folder(str(tmp_path / "out" / "align" / "round-1" / "weights"))
    tensors = dict(tensors)
    assert kind == "lora" and {k.split(".")[0] for k in tensors} == {"transformer", "transformer_2"}
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if ".lora_B." in k and k.startswith("transformer_2."))
    assert any(float(t.abs().sum()) > 0 for k, t in tensors.items() if ".lora_B." in k and k.startswith("transformer."))
    assert result.rows[-1]["weights_version"] == 1
