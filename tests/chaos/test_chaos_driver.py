"""Chaos: the ``align`` driver SIGKILLed during round 1's pairs, then during its refresh, then during its
held-out evaluation; ``--resume`` after each finishes the job with nothing lost and nothing redone twice.
Faults while recovering, in round 2 of the resumed job: a generator replica is SIGKILLed, then SIGKILLed
again while Ray restarts it (its constructor loading the model and round 1's weights), and the same for a
reward actor; the round still pairs every prompt once, on-policy. (A kill during training is in
tests/test_align.py; losing the head node in tests/test_reproducible.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides


def _state(state_uri: str) -> dict:
    try:
        with open(state_uri) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _phase(state_uri: str, index: int) -> str:
    return next((r["phase"] for r in _state(state_uri).get("rounds", []) if r["index"] == index), "")


def _shards(folder: str) -> dict[str, float]:
    if not os.path.isdir(folder):
        return {}
    return {n: os.path.getmtime(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".parquet")}


def _kill_driver_when(argv: list[str], ready, timeout_s: float = 600) -> str:
    """Start the driver, SIGKILL it once ``ready()`` holds; returns what ``ready`` saw (or raises)."""
    driver = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    seen = ""
    while driver.poll() is None and time.time() < deadline:
        seen = ready()
        if seen:
            break
        time.sleep(0.05)
    driver.kill()
    _, err = driver.communicate()
    assert seen, f"the driver ended before the moment to kill it: {err.decode()[-3000:]}"
    return seen


def _constructing(class_name: str, exclude: int) -> int | None:
    """A process running ``class_name``'s constructor: Ray titles it ``ray::<class>.__init__``."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.info["pid"] != exclude and " ".join(proc.info["cmdline"] or []).startswith(f"ray::{class_name}.__init__"):
            return proc.info["pid"]
    return None


def _kill_twice(class_name: str, ready, killed: list, timeout_s: float = 600) -> None:
    """Once ``ready()``: SIGKILL a live actor of ``class_name``, then the process Ray restarts it in, while its
    constructor runs."""
    from ray._private.state import actors  # the GCS actor table

    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            return
        time.sleep(0.05)
    first = next(a["Pid"] for a in actors().values() if a["ActorClassName"].endswith(class_name) and a["State"] == "ALIVE")
    os.kill(first, signal.SIGKILL)
    killed.append((class_name, "alive", first))
    while time.time() < deadline:
        again = _constructing(class_name, exclude=first)
        if again:
            os.kill(again, signal.SIGKILL)
            killed.append((class_name, "restarting", again))
            return
        time.sleep(0.02)


def _videos(folder) -> int:
    return sum(n.endswith(".mp4") for _, _, names in os.walk(folder) for n in names)


def test_align_driver_killed_during_pairs_refresh_and_eval_resumes_without_loss(ray_cluster, tmp_path, model_cache):
    from anisora_ray.config import load_config
    from anisora_ray.loop.align import run_alignment
    from anisora_ray.pairs.writer import read_pairs, read_skipped

    overrides = [*config_overrides(tmp_path, model_cache), "loop.rounds=2", "gapo.steps=2", "generator.replicas=1",
                 "data.demo_prompts=4", "pairs.flush_every=1", "eval.demo_prompts=3", "eval.candidates_per_prompt=2",
                 "loop.registered_model=null", f"ray.address={ray_cluster.address}", "ray.log_to_driver=false"]
    out = tmp_path / "out" / "align"
    state_uri, pairs1 = str(out / "state.json"), str(out / "round-1" / "pairs")
    argv = [sys.executable, os.path.join(REPO, "jobs", "align.py"), "--quiet", "--resume", "--config", LOCAL_CONFIG]
    for o in overrides:
        argv += ["--set", o]
    began = time.perf_counter()

    # 1. during round 1's pairs: some prompts are written, the phase is not finished
    _kill_driver_when(argv, lambda: "pairs" if _shards(pairs1) and _phase(state_uri, 1) in ("", "started") else "")
    written_before = _shards(pairs1)
    assert written_before and _phase(state_uri, 1) in ("", "started")
    # 2. during round 1's refresh: trained, not yet refreshed (the kill may land a moment later)
    killed_at = [_kill_driver_when(argv, lambda: _phase(state_uri, 1) if _phase(state_uri, 1) == "trained" else "")]
    # 3. during round 1's held-out evaluation
    killed_at.append(_kill_driver_when(argv, lambda: _phase(state_uri, 1) if _phase(state_uri, 1) == "refreshed" else ""))

    pairs2 = out / "round-2" / "pairs"
    killed: list = []
    killers = [threading.Thread(target=_kill_twice, args=(name, lambda n=n: _videos(pairs2) >= n, killed), daemon=True)
               for name, n in (("GeneratorActor", 2), ("DimensionActor", 6))]
    for killer in killers:
        killer.start()
    result = run_alignment(load_config(LOCAL_CONFIG, overrides), resume=True, progress=False, root=REPO)
    seconds = time.perf_counter() - began
    for killer in killers:
        killer.join(timeout=5)
    assert [(c, when) for c, when, _ in sorted(killed)] == [("DimensionActor", "alive"), ("DimensionActor", "restarting"),
                                                         ("GeneratorActor", "alive"), ("GeneratorActor", "restarting")]
    round2 = read_pairs(str(pairs2))
    ids2 = [p.prompt_id for p in round2] + [q.item_id for q in read_skipped(str(pairs2))]
    print(f"killed while recovering (round 2): lost={4 - len(set(ids2))} duplicated={len(ids2) - len(set(ids2))} "
          f"kills={[(c, w) for c, w, _ in killed]}")
    assert len(ids2) == len(set(ids2)) == 4 and {p.weights_version for p in round2} == {1}
    pairs = read_pairs(pairs1)
    ids = [p.prompt_id for p in pairs] + [q.item_id for q in read_skipped(pairs1)]
    lost, duplicated = 4 - len(set(ids)), len(ids) - len(set(ids))
    print(f"\ndriver-kills (pairs, {killed_at[0]}, {killed_at[1]}): lost={lost} duplicated={duplicated} "
          f"retried={len(killed_at) + 1} seconds={seconds:.1f}")
    assert lost == 0 and duplicated == 0
    assert all(_shards(pairs1)[name] == mtime for name, mtime in written_before.items())  # finished prompts not redone
    state = _state(state_uri)
    assert [(r["index"], r["phase"], r["weights_version"]) for r in state["rounds"]] == [(1, "evaluated", 1), (2, "evaluated", 2)]
    assert [row["round"] for row in result.rows] == [0, 1, 2] and all(0 <= row["heldout_reward"] <= 1 for row in result.rows)
    assert {p.weights_version for p in read_pairs(str(out / "round-2" / "pairs"))} == {1}  # on-policy after the kills
