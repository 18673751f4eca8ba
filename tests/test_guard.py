"""The reward-hacking guard: its own measures, the decision rule, and the best round to roll back to."""

import math

import numpy as np
import pytest

from anisora_ray.eval.guard import (
    check_guard,
    first_frame_psnr,
    frame_difference,
    named_hue_share,
)
from anisora_ray.loop.guard import best_round


def _solid(rgb, frames=6, size=16) -> np.ndarray:
    return np.tile(np.asarray(rgb, np.uint8), (frames, size, size, 1))


def test_own_measures_see_motion_fidelity_and_the_named_colour():
    still = _solid((200, 40, 40))
    assert frame_difference(still) == 0.0
    flicker = still.copy()
    flicker[1::2] = 0
    assert frame_difference(flicker) == pytest.approx(np.abs(np.diff(flicker.astype(float), axis=0)).mean() / 255)
    assert first_frame_psnr(still, still[0]) == 60.0  # identical: capped
    assert first_frame_psnr(flicker[1:], still[0]) < 10
    red, blue = _solid((220, 30, 30)), _solid((40, 80, 230))
    assert named_hue_share(red, "a red fox runs") == 1.0 and named_hue_share(blue, "a red fox runs") == 0.0
    assert named_hue_share(blue, "a blue cat") == 1.0
    assert named_hue_share(_solid((128, 128, 128)), "a red fox") == 0.0  # grey is not red, whatever its RGB distance
    assert math.isnan(named_hue_share(red, "a white rabbit"))  # no chromatic colour named: left out


def _by_prompt(values) -> dict[str, float]:
    return {f"p{i}": float(v) for i, v in enumerate(values)}


def test_guard_fires_only_when_the_reward_rises_while_a_measure_falls_beyond_the_margin():
    rng = np.random.default_rng(0)
    base = {"first_frame_psnr": _by_prompt(rng.uniform(14, 16, 16)), "frame_difference": _by_prompt(rng.uniform(0.02, 0.03, 16))}
    hacked = {"first_frame_psnr": {k: v * 0.7 + rng.normal(0, 0.1) for k, v in base["first_frame_psnr"].items()},
              "frame_difference": {k: v * 1.5 for k, v in base["frame_difference"].items()}}
    fired, findings = check_guard(base, hacked, reward_gain=0.05, margin=0.10, alpha=0.05, samples=500)
    assert fired
    fell = {f.measure: f for f in findings if f.fell}
    assert set(fell) == {"first_frame_psnr"} and fell["first_frame_psnr"].guards == "image_video"
    assert fell["first_frame_psnr"].mean_diff < -1.0 and fell["first_frame_psnr"].p_value < 0.001
    # the same fall with a reward that did not rise: not hacking, the round was just worse
    assert not check_guard(base, hacked, reward_gain=-0.01, margin=0.10, alpha=0.05, samples=500)[0]
    # a significant fall smaller than the margin (5% against a 10% margin) does not fire
    small = {"first_frame_psnr": {k: v * 0.95 for k, v in base["first_frame_psnr"].items()}}
    assert not check_guard(base, small, reward_gain=0.05, margin=0.10, alpha=0.05, samples=500)[0]
    assert check_guard(base, small, reward_gain=0.05, margin=0.02, alpha=0.05, samples=500)[0]
    # noise around no change does not fire
    noise = {"first_frame_psnr": {k: v + rng.normal(0, 0.3) for k, v in base["first_frame_psnr"].items()}}
    assert not check_guard(base, noise, reward_gain=0.05, margin=0.0, alpha=0.01, samples=500)[0]


def test_best_round_skips_the_rounds_the_guard_flagged():
    rows = [{"round": 0, "heldout_reward": 0.40}, {"round": 1, "heldout_reward": 0.43},
            {"round": 2, "heldout_reward": 0.50}, {"round": 3, "heldout_reward": 0.47}]
    assert best_round(rows, set()) == 2
    assert best_round(rows, {2}) == 3
    assert best_round(rows, {1, 2, 3}) == 0


def test_evidence_from_weight_free_stand_ins_alone_warns_instead_of_rolling_back():
    from anisora_ray.config import load_config
    from anisora_ray.loop.guard import decide
    from tests.conftest import LOCAL_CONFIG

    rng = np.random.default_rng(1)
    base = {m: _by_prompt(rng.uniform(0.6, 0.8, 12)) for m in ("subject_consistency", "first_frame_psnr")}
    fell = {m: {k: v * 0.6 for k, v in base[m].items()} for m in base}
    only_subject = {"subject_consistency": fell["subject_consistency"], "first_frame_psnr": base["first_frame_psnr"]}
    row = {"mean_diff": 0.05}
    weight_free = load_config(LOCAL_CONFIG, ["loop.guard.action=rollback", "eval.bootstrap_samples=200"])
    verdict = decide(weight_free, base, only_subject, row, 2)
    assert verdict["fired"] and verdict["action"] == "warn"
    assert "pixel thumbnails stand in for DINO" in verdict["downgraded"]
    learned = load_config(LOCAL_CONFIG, ["loop.guard.action=rollback", "eval.bootstrap_samples=200",
                                         "eval.metrics.subject_backbone=facebook/dinov2-base"])
    assert decide(learned, base, only_subject, row, 2)["action"] == "rollback"  # a learned measure fell
    both = decide(weight_free, base, fell, row, 2)  # the guard's own measure fell too: acted on
    assert both["action"] == "rollback" and "downgraded" not in both


def test_a_verdict_made_inside_a_rounds_run_goes_to_the_jobs_run(tmp_path):
    """``guard.record`` tags the job's MLflow run and logs ``guard.json`` there, though the round's run is active
    when the verdict is made (``stop`` never reaches the rollback, which records outside it)."""
    import json

    import mlflow

    from anisora_ray.loop import guard

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        experiment = client.create_experiment("guard", artifact_location=(tmp_path / "artifacts").as_uri())
        job = client.create_run(experiment).info.run_id
        with mlflow.start_run(experiment_id=experiment) as round_run:
            uri = guard.record(str(tmp_path), {"round": 2, "action": "stop", "fired": True}, job)
        tags = {r: client.get_run(r).data.tags for r in (job, round_run.info.run_id)}
        artifacts = [a.path for a in client.list_artifacts(job)]
    finally:
        mlflow.set_tracking_uri(None)
    assert tags[job]["anisora.guard"] == "fired at round 2: stop" and "anisora.guard" not in tags[round_run.info.run_id]
    assert artifacts == ["guard.json"] and json.loads(open(uri).read())["action"] == "stop"


def test_a_guard_measure_no_video_could_be_measured_is_said_not_skipped_in_silence(tmp_path, caplog):
    """``measure_round`` leaves out a measure with no finite value (nothing to test) and says so, with the videos'
    errors: before, a backbone failing on every video turned the guard off without a word."""
    import pyarrow as pa

    from anisora_ray.config import load_config
    from anisora_ray.eval.vbench import MEASURES, METRICS_FILE
    from anisora_ray.io import fs
    from anisora_ray.loop.guard import measure_round
    from tests.conftest import LOCAL_CONFIG

    cfg = load_config(LOCAL_CONFIG)
    rows = [{"prompt_id": f"p{i}", "seed": i, "metrics_error": "ValueError: all the input array dimensions must match",
             **{m: (float("nan") if m == "subject_consistency" else 0.5) for m in MEASURES}} for i in range(3)]
    fs.write_table(pa.Table.from_pylist(rows), str(tmp_path / METRICS_FILE))
    with caplog.at_level("WARNING", logger="anisora_ray.loop.guard"):
        measured = measure_round(cfg, str(tmp_path))
    assert "subject_consistency" not in measured and set(measured) == set(cfg.loop.guard.measures) - {"subject_consistency"}
    assert "no held-out video could be measured for ['subject_consistency']" in caplog.text
    assert "3 video(s): ValueError: all the input array dimensions must match" in caplog.text


def test_the_guard_compares_the_seeds_both_rounds_measured_and_says_when_it_cannot_fire(caplog):
    """A candidate measured in round 0 but not in round r (quarantined, unreadable) made its prompt's mean cover
    other seeds: a fall of 0.2 with no video changing. And with 5 prompts the exact test's smallest p is 1/16."""
    from anisora_ray.config import load_config
    from anisora_ray.loop.guard import decide
    from tests.conftest import LOCAL_CONFIG

    cfg = load_config(LOCAL_CONFIG, ["eval.bootstrap_samples=200"])
    prompts = [f"p{i}" for i in range(8)]
    base = {"first_frame_psnr": {p: {"0": 0.5, "1": 0.9} for p in prompts}}
    lost = {"first_frame_psnr": {p: {"0": 0.5} for p in prompts}}  # seed 1 not measured in round r: unchanged
    verdict = decide(cfg, base, lost, {"mean_diff": 0.05}, 2)
    assert not verdict["fired"] and verdict["findings"][0]["mean_diff"] == 0.0
    fell = {"first_frame_psnr": {p: {"0": 0.2} for p in prompts}}
    assert decide(cfg, base, fell, {"mean_diff": 0.05}, 2)["fired"]  # a real fall on the shared seed still fires
    few = {"first_frame_psnr": {p: {"0": 0.5, "1": 0.9} for p in prompts[:5]}}
    with caplog.at_level("WARNING", logger="anisora_ray.loop.guard"):
        verdict = decide(cfg, few, {"first_frame_psnr": {p: {"0": 0.1, "1": 0.1} for p in prompts[:5]}},
                         {"mean_diff": 0.05}, 2)
    assert not verdict["fired"] and verdict["cannot_fire"] == ["first_frame_psnr"]
    assert "the guard cannot fire on ['first_frame_psnr']" in caplog.text
