"""The soak benchmark, short: two rounds of `align` under random SIGKILLs (replicas, reward actors, Ray Data
and Ray Train workers) against an undisturbed run of the same seeds (benchmarks/soak.py; the long run's
figures are in docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_a_short_soak_loses_nothing_and_repeats_the_undisturbed_run(tmp_path, model_cache):
    out = tmp_path / "soak"
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "soak.py"), "--rounds", "2",
                           "--fault-every", "15", "--seed", "1", "--out", str(out), "--model-cache", model_cache],
                          cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    print(done.stdout[-3000:])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((out / "soak.json").read_text())
    faults = result["runs"]["faults"]["faults"]
    assert faults and all(f["target"] in ("GeneratorActor", "DimensionActor", "MapWorker", "RayTrainWorker", "RayDataTask") for f in faults)
    assert result["checks"] == {**result["checks"], "lost": 0, "duplicated": 0, "same_pairs": True, "same_table": True}
    samples = result["runs"]["faults"]["samples"]
    assert sorted(samples) == ["0", "1", "2"] and all(s["driver_rss_mb"] > 0 and s["output_mb"] > 0 for s in samples.values())
    assert (out / "soak.png").stat().st_size > 10_000 and "slope" in (out / "soak.md").read_text()
