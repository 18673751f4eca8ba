"""benchmarks/realsize_gpu.py stays runnable on a bare GPU machine: at tiny size on the CPU, with Ray made
unimportable, it generates a video and runs GAPO updates with the project's code under ZeRO-2 + LoRA and
under ZeRO-3 (partitioned, optimizer offload) with a partitioned reference engine and the gathered export."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.conftest import REPO


def test_realsize_check_runs_without_ray_at_tiny_size(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()  # imported at start-up by this process and the phases it starts: `import ray` raises
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), REPO])}
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "realsize_gpu.py"), "--tiny", "--out",
                           str(tmp_path / "run"), "--gapo-steps", "2", "--gapo-compile", "lora", "--json", str(tmp_path / "result.json")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    rows = {r["phase"]: r for r in json.loads((tmp_path / "result.json").read_text())["rows"]}
    assert set(rows) == {"generate", "lora", "zero3"}
    assert rows["generate"]["frames"] == 9 and rows["generate"]["seconds_per_video"] > 0
    assert rows["lora"]["zero_stage"] == 2 and rows["lora"]["reference"] == "adapter off"
    # gapo.compile: with the warm-up's zero learning rate the adapter has barely moved, so the policy and its
    # adapter-off reference agree and the loss is log 2 x gain (2^0.8 - 2^0.3), as eager gives it. Without
    # eager rounding, the compiled training and inference graphs differ in bf16 and beta turns that into ~0.18.
    assert rows["lora"]["compiled"] is True and rows["zero3"]["compiled"] is False
    assert abs(rows["lora"]["loss"] - math.log(2) * (2**0.8 - 2**0.3)) < 1e-3
    assert rows["zero3"]["zero_stage"] == 3 and rows["zero3"]["reference"] == "ZeRO-3 partitioned engine"
    assert rows["zero3"]["export_files"] > 1  # gathered and written bucket by bucket
    for phase in ("lora", "zero3"):
        assert rows[phase]["encoder_loads"] == 1  # the encoders ran once, for the missing latents
        assert rows[phase]["seconds_per_update"] > 0 and rows[phase]["loss"] == rows[phase]["loss"]  # finite
    assert "real-size check on cpu" in done.stdout


def test_realsize_check_runs_the_wan_family_without_ray_at_tiny_size(tmp_path):
    """``--family wan_i2v`` (Wan2.2-TI2V-5B at real size): the same generate and LoRA phases, Ray unimportable."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), REPO])}
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "realsize_gpu.py"), "--tiny", "--family",
                           "wan_i2v", "--phases", "generate,lora", "--out", str(tmp_path / "run"), "--gapo-steps", "1",
                           "--json", str(tmp_path / "result.json")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    rows = {r["phase"]: r for r in result["rows"]}
    assert result["family"] == "wan_i2v" and set(rows) == {"generate", "lora"}
    assert rows["generate"]["frames"] == 9 and rows["lora"]["zero_stage"] == 2
    assert abs(rows["lora"]["loss"] - math.log(2) * (2**0.8 - 2**0.3)) < 1e-3  # warm-up lr 0: policy = reference
    assert "real-size check on cpu (tiny wan_i2v)" in done.stdout

