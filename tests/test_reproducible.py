"""Runs are reproducible with lossless video: two fresh runs of a short alignment loop, same config and
seeds, run at the same time, give the same held-out table and byte-identical trained weights
(``video.crf=0``; lossy x264 at tiny sizes is not bit-stable, see configs/local.yaml)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides

KEYS = ("round", "weights_version", "heldout_reward", "mean_diff", "ci_low", "ci_high", "p_value", "wins", "pairs",
        "train_loss", "heldout_visual_motion", "heldout_character")


def _start(root, model_cache) -> subprocess.Popen:
    overrides = [*config_overrides(root, model_cache), "loop.rounds=1", "gapo.steps=4", "generator.replicas=1",
                 "data.demo_prompts=3", "eval.demo_prompts=3", "eval.candidates_per_prompt=1",
                 "loop.registered_model=null", "video.crf=0"]
    argv = [sys.executable, "-m", "anisora_ray.cli", "align", "--quiet", "--config", LOCAL_CONFIG]
    for o in overrides:
        argv += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray, as `make demo` starts
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "output.txt"), "w") as output:  # files, not pipes: neither run waits on a reader
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)


def _result(run: subprocess.Popen, root) -> tuple[list[dict], str]:
    run.wait(timeout=900)
    with open(os.path.join(root, "output.txt")) as f:
        assert run.returncode == 0, f.read()[-6000:]
    with open(os.path.join(root, "out", "align", "state.json")) as f:
        state = json.load(f)
    rows = [state["baseline"]["row"], *(r["metrics"] for r in state["rounds"])]
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "out", "align", "round-1", "weights", "*.safetensors"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    weights = digest.hexdigest()
    return [{k: r.get(k) for k in KEYS} for r in rows], weights


def test_two_fresh_runs_of_the_same_config_give_the_same_table_and_weights(tmp_path, model_cache):
    # both at once, each on its own fresh local Ray: the results may not depend on timing or load either
    runs = {name: _start(tmp_path / name, model_cache) for name in ("a", "b")}
    first, second = (_result(run, tmp_path / name) for name, run in runs.items())
    assert first[0] == second[0]  # every number of the table, exactly
    assert first[1] == second[1]  # the trained weights, byte for byte
    assert first[0][1]["pairs"] == 3 and first[0][1]["weights_version"] == 1
