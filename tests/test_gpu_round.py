"""The CPU twin of benchmarks/gpu_round.sh: the 1-GPU config's round (one replica, the six released scorers,
a LoRA GAPO worker, fractional GPU requests on one GPU) at tiny sizes, through the same script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_the_one_gpu_round_runs_end_to_end_at_tiny_size(tmp_path):
    out = tmp_path / "round"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_round.py"), "--tiny", "--out", str(out),
                           "--json", str(tmp_path / "round.json")], capture_output=True, text=True, timeout=900,
                          cwd=REPO, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "round.json").read_text())
    phases = result["phases_seconds"]
    for phase in ("round0_eval", "round1_pairs", "round1_train", "round1_refresh", "round1_eval"):
        assert phases[phase] > 0, phases
    assert result["round1"]["pairs"] == 2 and math.isfinite(result["round1"]["train_loss"])
    for audit in result["cache_audit"].values():  # FasterCache audited at both evaluations: 2 prompts x 2 seeds
        assert audit["cache_audit_videos"] == 4 and audit["cache_audit_drift_mean_levels"] > 0, result["cache_audit"]
    state = json.loads((out / "run" / "align" / "state.json").read_text())
    assert state["rounds"][0]["weights_version"] == 1 and state["rounds"][0]["phase"] == "evaluated"
    # the six released scorers each converted their dimension once, the character gallery embedded once
    converted = list((out / "models" / "cache" / "animereward").glob("*/*/.converted"))
    assert len(converted) == 6
