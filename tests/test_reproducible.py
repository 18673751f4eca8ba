"""Runs are reproducible with lossless video, and survive losing the head node: two fresh runs of a short
alignment loop, same config and seeds, run at the same time: one on its own local Ray, the other on a
`ray start` head that is SIGKILLed mid-round with its driver (GCS, raylet, workers, driver: all gone). A new
head comes up, the job runs again with ``--resume``, and ends with no prompt lost or paired twice, the same
held-out table and byte-identical trained weights (``video.crf=0``; lossy x264 at tiny sizes is not
bit-stable, see configs/local.yaml)."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides, start_ray_head, stop_ray_head

KEYS = ("round", "weights_version", "heldout_reward", "mean_diff", "ci_low", "ci_high", "p_value", "wins", "pairs",
        "train_loss", "heldout_visual_motion", "heldout_character")
PROMPTS = 4


def _start(root, model_cache, address: str | None = None, resume: bool = False) -> subprocess.Popen:
    overrides = [*config_overrides(root, model_cache), "loop.rounds=1", "gapo.steps=4", "generator.replicas=1",
                 f"data.demo_prompts={PROMPTS}", "pairs.flush_every=1", "eval.demo_prompts=3",
                 "eval.candidates_per_prompt=1", "loop.registered_model=null", "video.crf=0",
                 *([f"ray.address={address}"] if address else [])]
    argv = [sys.executable, "-m", "anisora_ray.cli", "align", "--quiet", "--config", LOCAL_CONFIG,
            *(["--resume"] if resume else [])]
    for o in overrides:
        argv += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no address: a fresh local Ray, as `make demo`
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "output.txt"), "a") as output:  # files, not pipes: neither run waits on a reader
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


def _pairs_shards(root) -> list[str]:
    return glob.glob(os.path.join(root, "out", "align", "round-1", "pairs", "pairs-*.parquet"))


def _round1(root) -> tuple[int, str]:
    """Round 1's videos so far, and its phase."""
    videos = glob.glob(os.path.join(root, "out", "align", "round-1", "pairs", "videos", "*", "*.mp4"))
    try:
        with open(os.path.join(root, "out", "align", "state.json")) as f:
            phase = next((r["phase"] for r in json.load(f)["rounds"] if r["index"] == 1), "")
    except (OSError, ValueError, KeyError):
        phase = ""
    return len(videos), phase


def test_two_fresh_runs_give_the_same_table_and_weights_even_when_one_loses_its_head_node(tmp_path, model_cache):
    undisturbed, killed = tmp_path / "a", tmp_path / "b"
    runs: dict[str, subprocess.Popen] = {}
    try:
        _run(runs, undisturbed, killed, tmp_path, model_cache)
    finally:  # a failed check leaves no driver running
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait(timeout=60)


def _run(runs, undisturbed, killed, tmp_path, model_cache) -> None:
    from anisora_ray.pairs.writer import read_pairs, read_skipped

    head, address, _ = start_ray_head(tmp_path / "head-1.log")
    try:
        runs.update(a=_start(undisturbed, model_cache), b=_start(killed, model_cache, address))
        deadline = time.time() + 600
        while _round1(killed)[0] < 2 and runs["b"].poll() is None and time.time() < deadline:
            time.sleep(0.05)  # mid-round: round 1 is generating its candidates
        # the head node goes, and the driver with it (on a cluster the driver runs on the head)
        os.killpg(head.pid, signal.SIGKILL)
        runs["b"].kill()
        head.wait(timeout=30)
        runs["b"].wait(timeout=30)
        videos, phase = _round1(killed)
        written = len(_pairs_shards(killed))
        assert videos >= 2 and phase in ("", "started"), f"the kill missed round 1's pairs ({phase}, {videos} videos)"
    finally:
        stop_ray_head(head, signal.SIGKILL)
    first = _result(runs["a"], undisturbed)  # (a new head on a machine this small starts faster without it)
    began = time.perf_counter()
    head, address, _ = start_ray_head(tmp_path / "head-2.log")  # a new head: nothing of the old cluster's state
    try:
        runs["resumed"] = _start(killed, model_cache, address, resume=True)
        second = _result(runs["resumed"], killed)
    finally:
        stop_ray_head(head)
    pairs_uri = str(killed / "out" / "align" / "round-1" / "pairs")
    ids = [p.prompt_id for p in read_pairs(pairs_uri)] + [q.item_id for q in read_skipped(pairs_uri)]
    print(f"\nhead-loss: lost={PROMPTS - len(set(ids))} duplicated={len(ids) - len(set(ids))} "
          f"videos_before={videos} prompts_written_before={written} resume_seconds={time.perf_counter() - began:.1f}")
    assert sorted(ids) == sorted(set(ids)) and len(ids) == PROMPTS  # none lost, none twice
    assert first[0] == second[0]  # every number of the table, exactly
    assert first[1] == second[1]  # the trained weights, byte for byte
    assert first[0][1]["pairs"] == len(read_pairs(pairs_uri)) and first[0][1]["weights_version"] == 1
