"""The guard on the embedded default: a reward that pays for motion alone is caught and rolled back.

This runs the real embedded default (the warm-started tiny generator of configs/local.yaml, cached
where `make demo` caches it) with every weight but visual_motion's set to 0, at the previous default's
learning rate. Measured (docs/evaluation.md): after one round the held-out reward rises while the first
frame drifts from the input image (27.1 -> 24.0 dB); the guard rolls back to the untrained round 0.
"""

import json
import os

from tests.conftest import LOCAL_CONFIG, REPO

HACK = ["reward.dimensions.visual_smoothness.weight=0", "reward.dimensions.visual_appeal.weight=0",
        "reward.dimensions.text_video.weight=0", "reward.dimensions.image_video.weight=0",
        "reward.dimensions.character.weight=0"]
AGGRESSIVE = ["gapo.learning_rate=1e-3"]  # the old default's rate: at the default 1e-4 motion-only barely moves


def test_a_motion_only_reward_drives_the_first_frame_away_and_the_guard_rolls_back(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    from anisora_ray.config import load_config
    from anisora_ray.loop.align import run_alignment
    from anisora_ray.loop.state import AlignState
    from anisora_ray.tracking import tracking_uri, use_tracking_uri

    overrides = [f"run.output_dir={tmp_path / 'out'}", f"ray.address={ray_cluster.address}", "ray.log_to_driver=false",
                 "loop.rounds=2", "data.demo_prompts=8", "eval.demo_prompts=8",
                 "loop.guard.action=rollback", "loop.registered_model=anisora-guard-test", *HACK, *AGGRESSIVE]
    cfg = load_config(LOCAL_CONFIG, overrides)
    result = run_alignment(cfg, progress=False, root=REPO)

    verdict = result.guard
    assert verdict and verdict["fired"] and verdict["action"] == "rollback", result.rows
    fell = {f["measure"]: f for f in verdict["findings"] if f["fell"]}
    assert "first_frame_psnr" in fell and fell["first_frame_psnr"]["after"] < 0.9 * fell["first_frame_psnr"]["before"]
    assert verdict["reward_gain"] > 0 and result.rows[verdict["round"]]["mean_diff"] > 0  # the reward did rise
    best = verdict["best_round"]
    assert best < verdict["round"] and not result.rows[best].get("guard_fired")
    state = AlignState.load(result.state_uri)
    assert (state.latest_weights().index if state.latest_weights() else 0) == best  # what replicas load from now on
    with open(os.path.join(tmp_path, "out", "align", "guard.json")) as f:
        assert json.load(f)["best_round"] == best

    use_tracking_uri(tracking_uri(cfg))
    client = MlflowClient()
    alias = client.get_model_version_by_alias("anisora-guard-test", "best")
    assert str(alias.version) == verdict["best_model_version"] and alias.tags["round"] == str(best)
    assert client.get_run(result.parent_run_id).data.tags["anisora.guard"].startswith("fired at round")

    # a job that died during its rollback (verdict saved, replicas not yet back, alias not set) finishes the rollback
    # when resumed, and a resumed job with more rounds does not train past the guard
    state.guard = {k: v for k, v in state.guard.items() if k not in ("best_round", "best_model_version")}
    fired = state.round(verdict["round"]).metrics  # ... and before that round's pruning and size records
    assert {k: fired.pop(k) for k in ("output_dir_mb", "written_mb", "pruned_mb")}
    state.save(result.state_uri)
    client.delete_registered_model_alias("anisora-guard-test", "best")
    again = run_alignment(load_config(LOCAL_CONFIG, [*overrides, "loop.rounds=3"]), resume=True, progress=False, root=REPO)
    assert again.guard["best_round"] == best and not os.path.exists(tmp_path / "out" / "align" / f"round-{verdict['round'] + 1}")
    assert {k: v for k, v in again.guard.items() if k != "best_model_version"} == {
        k: v for k, v in verdict.items() if k != "best_model_version"}
    alias = client.get_model_version_by_alias("anisora-guard-test", "best")  # round 0 registered anew: a new version
    assert str(alias.version) == again.guard["best_model_version"] and alias.tags["round"] == str(best)
    assert AlignState.load(result.state_uri).guard == again.guard
    resumed = AlignState.load(result.state_uri).round(verdict["round"]).metrics
    assert resumed["written_mb"] > 0 and "output_dir_mb" in resumed  # recorded by the resume, which stops at the guard
