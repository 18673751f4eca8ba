"""GAPO with Ray Train + DeepSpeed ZeRO-2 on CPU (gloo), two workers, on pairs from the real pairs pipeline."""

from __future__ import annotations

import math
import os

from tests.conftest import REPO


def test_two_worker_zero2_gapo_run_on_streamed_pairs(ray_cluster, make_config, demo_manifest, tmp_path):
    from safetensors.torch import load_file

    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.pairs.stage import run_pairs
    from anisora_ray.pairs.writer import pairs_table

    cfg = make_config("generator.replicas=1", "gapo.num_workers=2", "gapo.steps=2", "gapo.beta=500")
    pairs = run_pairs(cfg, demo_manifest, str(tmp_path / "pairs"), progress=False)
    assert pairs.pairs >= 2
    metrics = train_gapo(cfg, pairs_table(str(tmp_path / "pairs")), str(tmp_path / "transformer"), root=REPO)
    assert metrics["step"] == 2 and math.isfinite(metrics["loss"]) and metrics["gain"] > 0
    weights = load_file(str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert weights and all(t.isfinite().all() for t in weights.values())
    assert os.path.isfile(tmp_path / "transformer" / "config.json")


def test_a_missing_deepspeed_config_is_named(make_config, tmp_path):
    import pytest

    from anisora_ray.errors import ConfigError
    from anisora_ray.gapo.trainer import deepspeed_config

    cfg = make_config("gapo.deepspeed_config=configs/deepspeed/zero9.json", "gapo.pairs_per_step=2")
    with pytest.raises(ConfigError, match="gapo.deepspeed_config = 'configs/deepspeed/zero9.json'"):
        deepspeed_config(cfg, REPO)
    ds = deepspeed_config(make_config("gapo.pairs_per_step=2"), REPO)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no op compile
