"""Full fine-tuning's frozen reference under ZeRO-2 training: a partitioned ZeRO-3 engine (the default) gives
the same prediction errors as a frozen copy, and holds no whole parameter outside its forward. Runs
GapoWorker in a child process (world size 1, gloo) so no process group is left in the test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import LOCAL_CONFIG, REPO, gapo_child_script

CHILD = gapo_child_script(29587, """
    from anisora_ray.gapo.diffusion import draw_for, pair_errors
    overrides = arg
    result = {}
    bf16 = ["gapo.deepspeed_config=configs/deepspeed/zero2_bf16.json"]
    wan = config.replace("local.yaml", "local_wan.yaml")  # Wan's rotary tables are fp32 buffers
    for kind, source, extra in (("partitioned", config, []), ("copy", config, []), ("copy-bf16", config, bf16),
                                ("copy-bf16-wan", wan, bf16)):
        cfg = load_config(source, overrides + extra + [f"gapo.reference={kind.split('-')[0]}", "gapo.steps=1"])
        worker = GapoWorker(cfg, resolve_pretrained(cfg.model, cfg.generator), deepspeed_config(cfg, root), torch.device("cpu"))
        worker.prepare([row])
        batch = worker.encoder.batch([row])
        draw = draw_for(worker.family, worker.pipe, batch, torch.Generator().manual_seed(1))
        with torch.no_grad():
            ew, el = pair_errors(worker.family, worker.pipe, worker.reference, batch, draw)
            pw, pl = pair_errors(worker.family, worker.pipe, worker.engine, batch, draw)
        module = getattr(worker.reference.module, "module", worker.reference.module)
        params = list(module.parameters())
        result[kind] = {"errors": [float(ew[0]), float(el[0])], "policy_errors": [float(pw[0]), float(pl[0])],
                        "stage": worker.engine.zero_optimization_stage(),
                        "whole_params": sum(p.numel() for p in params),
                        "full_params": sum(int(getattr(p, "ds_numel", p.numel())) for p in params)}
    print("RESULT " + json.dumps(result))
""")


def test_a_partitioned_reference_equals_a_frozen_copy_and_holds_no_whole_parameter(tmp_path, model_cache):
    from tests.conftest import config_overrides

    overrides = [o for o in config_overrides(tmp_path, model_cache)] + [
        "gapo.deepspeed_config=configs/deepspeed/zero2.json",
        "gapo.deepspeed_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), LOCAL_CONFIG, REPO, json.dumps(overrides)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    part, full = result["partitioned"], result["copy"]
    assert part["stage"] == full["stage"] == 2  # the policy trains under ZeRO-2 either way
    assert part["full_params"] == full["full_params"] == full["whole_params"] > 0
    assert part["whole_params"] == 0  # every reference parameter is a ZeRO-3 partition outside the forward
    assert part["errors"] == full["errors"]  # gathered on demand, it computes what the copy computes
    # before the first update the reference is the policy: the same errors, so the DPO margin starts at 0, also when
    # DeepSpeed trains in bf16 (it casts parameters only: the copy once cast Wan's fp32 rotary tables as well)
    for kind in ("partitioned", "copy", "copy-bf16", "copy-bf16-wan"):
        assert result[kind]["policy_errors"] == result[kind]["errors"], (kind, result[kind])
    assert result["copy-bf16"]["errors"] != full["errors"]  # it did run in bf16


def test_full_fine_tuning_compares_against_the_base_or_the_previous_round_as_configured(make_config, tmp_path):
    """``gapo.reference_weights``: ``base`` (the paper) keeps the pretrained weights in the reference every
    round; ``previous_round`` loads the folder the round starts from. LoRA with previous_round is refused."""
    import pytest
    import torch

    from anisora_ray.errors import ConfigError
    from anisora_ray.gapo.models import build_reference, load_transformer_pipeline
    from anisora_ray.models.pipeline import resolve_pretrained

    cfg = make_config("gapo.reference=copy")
    pretrained = resolve_pretrained(cfg.model, cfg.generator)
    previous = load_transformer_pipeline(pretrained, cfg, "cpu").transformer
    with torch.no_grad():
        for p in previous.parameters():
            p.add_(0.01)
    previous.save_pretrained(str(tmp_path / "round1"))
    base = load_transformer_pipeline(pretrained, cfg, "cpu").transformer.state_dict()

    def reference(kind: str) -> dict:
        c = make_config("gapo.reference=copy", f"gapo.reference_weights={kind}")
        return build_reference(None, pretrained, c, {}, str(tmp_path / "round1"), "cpu").module.state_dict()

    name = next(k for k, v in base.items() if v.is_floating_point() and v.numel() > 1)
    assert torch.equal(reference("base")[name], base[name])
    assert torch.equal(reference("previous_round")[name], previous.state_dict()[name])
    with pytest.raises(ConfigError, match="previous_round needs full fine-tuning"):
        make_config("gapo.lora.r=4", "gapo.reference_weights=previous_round")
