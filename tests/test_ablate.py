"""`anisora-ray ablate` and `anisora-ray eval` end to end on the mini-cluster (tiny models, real Ray Train)."""

import json
import math
import os

import pyarrow.parquet as pq
import pytest

from tests.conftest import LOCAL_CONFIG, REPO, config_overrides


def test_ablate_trains_variants_from_one_start_and_eval_reads_them_back(ray_cluster, tmp_path, model_cache):
    from anisora_ray.cli import main
    from anisora_ray.config import load_config
    from anisora_ray.errors import ConfigError
    from anisora_ray.eval.annotate import build_study, eval_labels
    from anisora_ray.generation.seeding import candidate_seeds
    from anisora_ray.loop.ablate import run_ablation
    from anisora_ray.pairs.writer import read_pairs

    overrides = [*config_overrides(tmp_path, model_cache), "generator.replicas=1", "gapo.steps=3",
                 "eval.demo_prompts=3", "eval.candidates_per_prompt=2", f"ray.address={ray_cluster.address}",
                 "ray.log_to_driver=false"]
    cfg = load_config(LOCAL_CONFIG, overrides)
    out = str(tmp_path / "ablate")
    with pytest.raises(ConfigError, match="no reward dimension 'motion'"):
        run_ablation(cfg, ["gapo", "no-motion"], out)
    # a variant asking for more than the cluster has fails at once, naming what it lacks (not at placement, minutes later)
    greedy = load_config(LOCAL_CONFIG, [*overrides, "eval.videoscore.num_gpus=100", "ray.wait_for_resources_s=0"])
    with pytest.raises(ConfigError, match="cannot run this config"):
        run_ablation(greedy, ["gapo", "reward=videoscore"], str(tmp_path / "greedy"), root=REPO, progress=False)
    # two variants, each ranking the same candidates with another reward (the loss variants, gapo/dpo/sft, train on
    # the full reward's pairs: test_a_loss_variant_trains_on_the_full_rewards_pairs; each fit here costs ~35 s)
    variants = ["no-visual_motion", "reward=videoscore"]
    comparison = run_ablation(cfg, variants, out, root=REPO, progress=False)

    # one start: the same round-0 evaluation; pairs from the same seeds, ranked without the dimension
    ablated = read_pairs(os.path.join(out, "pairs", "no-visual_motion"))
    assert len(ablated) == 3
    for pair in ablated:
        seeds = set(candidate_seeds(cfg.run.seed, pair.prompt_id, cfg.generator.candidates_per_prompt, round_index=1))
        assert {pair.winner_seed, pair.loser_seed} <= seeds and "visual_motion" not in pair.winner_scores
    assert not os.path.exists(os.path.join(out, "pairs", "full"))  # no variant asked for the full reward's pairs
    trained = {v: json.loads((tmp_path / "ablate" / v / "trained.json").read_text()) for v in variants}
    assert trained["no-visual_motion"]["pairs_uri"].endswith("pairs/no-visual_motion")
    assert trained["no-visual_motion"]["loss"] == "gapo"
    # the paper's Table 4: GAPO on pairs ranked by VideoScore (its five aspects; no character dimension)
    by_videoscore = read_pairs(os.path.join(out, "pairs", "reward=videoscore"))
    assert trained["reward=videoscore"]["pairs_uri"].endswith("pairs/reward=videoscore") and len(by_videoscore) == 3
    assert set(by_videoscore[0].winner_scores) == {"visual_smoothness", "visual_motion", "visual_appeal", "text_video",
                                                   "image_video"}

    # the table: every variant evaluated with the full reward on the same held-out prompts and seeds
    assert comparison["baseline"] == "round-0" and set(comparison["versions"]) == set(variants)
    dims = ["visual_smoothness", "visual_motion", "visual_appeal", "text_video", "image_video", "character"]
    assert comparison["metrics"][:7] == ["reward", *dims] and "dynamic_degree" in comparison["metrics"]
    for v in variants:
        rows = pq.read_table(os.path.join(out, v, "eval", "scores.parquet")).to_pylist()
        base = pq.read_table(os.path.join(out, "round-0", "eval", "scores.parquet")).to_pylist()
        assert sorted((r["prompt_id"], r["seed"]) for r in rows) == sorted((r["prompt_id"], r["seed"]) for r in base)
        assert {r["weights_version"] for r in rows} == {1} and all(0 <= r["visual_motion"] <= 1 for r in rows)
        win = comparison["versions"][v]["reward_win_rate"]
        assert win["n"] == 6 and 0 <= win["wins"] <= 6
        metrics = pq.read_table(os.path.join(out, v, "eval", "video-metrics.parquet")).to_pylist()
        assert len(metrics) == 6 and all(0 <= r["motion_smoothness"] <= 1 for r in metrics)
    table = (tmp_path / "ablate" / "ablation.md").read_text()
    assert "| visual_motion (n=3) |" in table and "no-visual_motion" in table and "win rate over round-0" in table
    # VideoScore as an evaluation suite: five aspects and their mean for every held-out video, compared like the rest
    assert [m for m in comparison["metrics"] if m.startswith("videoscore_")] == [
        "videoscore_visual_quality", "videoscore_temporal_consistency", "videoscore_dynamic_degree",
        "videoscore_text_to_video_alignment", "videoscore_factual_consistency", "videoscore_mean"]
    scored = pq.read_table(os.path.join(out, "no-visual_motion", "eval", "videoscore.parquet")).to_pylist()
    assert len(scored) == 6 and all(math.isfinite(r["videoscore_mean"]) for r in scored)
    assert all(abs(r["videoscore_mean"] - sum(r[f"videoscore_{a}"] for a in (
        "visual_quality", "temporal_consistency", "dynamic_degree", "text_to_video_alignment",
        "factual_consistency")) / 5) < 1e-9 for r in scored)
    header = table.splitlines()[0]
    assert header.startswith("| version | VBench-I2V: subject_consistency") and "VideoScore: mean" in header
    assert "AnimeReward: reward" in header and "| reward=videoscore |" in table

    from mlflow.tracking import MlflowClient

    from anisora_ray.tracking import tracking_uri

    logged = MlflowClient(tracking_uri(cfg)).get_run(comparison["mlflow_run_id"]).data.metrics
    assert {"no-visual_motion_reward_win_rate", "reward_videoscore_reward_win_rate"} <= set(logged)  # "=" is not a metric name

    # a second call redoes nothing: same weights, same table
    mtimes = {v: os.path.getmtime(tmp_path / "ablate" / v / "trained.json") for v in variants}
    again = run_ablation(cfg, variants, out, root=REPO, progress=False)
    assert {v: os.path.getmtime(tmp_path / "ablate" / v / "trained.json") for v in variants} == mtimes
    assert again["means"] == comparison["means"]

    # `anisora-ray eval` on the same folder reuses what ablate kept, and a study can be built on its labels
    argv = ["eval", "--config", LOCAL_CONFIG, "--versions",
            f"round-0=base,no-visual_motion={trained['no-visual_motion']['weights_uri']}",
            "--out", out]
    for o in overrides:
        argv += ["--set", o]
    assert main(argv) == 0
    evaluated = json.loads((tmp_path / "ablate" / "comparison.json").read_text())
    assert (evaluated["versions"]["no-visual_motion"]["metrics"]["reward"]
            == comparison["versions"]["no-visual_motion"]["metrics"]["reward"])
    assert eval_labels(out) == ["round-0", "no-visual_motion", "reward=videoscore"]
    store = build_study(out, trained="no-visual_motion")
    assert len(store.comparisons()) == 6
    assert {c["left_label"] for c in store.comparisons()} | {c["right_label"] for c in store.comparisons()} == {
        "round-0", "no-visual_motion"}


def test_a_reward_variant_lays_a_preset_over_the_configs_reward(tmp_path):
    from anisora_ray.config import load_config
    from anisora_ray.errors import ConfigError
    from anisora_ray.loop.ablate import variant_config

    cfg = load_config(LOCAL_CONFIG, ["gapo.loss=dpo"])
    preset = tmp_path / "motion-only.yaml"
    preset.write_text("reward:\n  dimensions:\n    visual_appeal: {weight: 0}\n    visual_motion: {weight: 3.0}\n")
    vcfg, key = variant_config(cfg, f"reward={preset}")
    dims = vcfg.reward.dimensions
    assert key == f"reward={preset}" and vcfg.gapo.loss == "gapo"  # GAPO, ranked by the other reward
    assert (dims.visual_appeal.weight, dims.visual_motion.weight) == (0.0, 3.0)
    assert dims.character == cfg.reward.dimensions.character  # what the preset does not name is kept
    assert cfg.reward.dimensions.visual_motion.weight == 1.0  # the config itself is untouched
    # VideoScore ranks with the run's eval.videoscore weights, where they run (local: tiny, on one CPU each)
    vs, key = variant_config(cfg, "reward=videoscore", root=REPO)
    appeal, evs = vs.reward.dimensions.visual_appeal, cfg.eval.videoscore
    assert appeal.backend == "videoscore" and appeal.options["checkpoint"] == evs.checkpoint == "tiny:videoscore"
    assert (appeal.actor.num_cpus, appeal.actor.num_gpus) == (evs.num_cpus, evs.num_gpus) == (1.0, 0.0)
    assert vs.reward.dimensions.character.weight == 0.0 and vs.video.sample_frames == 48
    assert vs.video.sample_size is None and cfg.video.sample_size == 32  # its processor sizes the frames, as released
    with pytest.raises(ConfigError, match="no reward preset"):
        variant_config(cfg, "reward=nonesuch", root=REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text("reward:\n  dimensions:\n    visual_motion: {wieght: 1}\n")
    with pytest.raises(ConfigError, match="wieght"):
        variant_config(cfg, f"reward={bad}")


def test_a_loss_variant_trains_on_the_full_rewards_pairs():
    from anisora_ray.config import load_config
    from anisora_ray.errors import ConfigError
    from anisora_ray.loop.ablate import variant_config

    cfg = load_config(LOCAL_CONFIG, [])
    for loss in ("gapo", "dpo", "sft"):  # the same pairs (key "full"), another loss; the reward is untouched
        vcfg, key = variant_config(cfg, loss)
        assert key == "full" and vcfg.gapo.loss == loss and vcfg.reward == cfg.reward
    assert cfg.gapo.loss == "gapo"
    vcfg, key = variant_config(cfg, "no-visual_motion")  # the same loss, ranked without the dimension
    assert key == "no-visual_motion" and vcfg.reward.dimensions.visual_motion.weight == 0 and vcfg.gapo.loss == "gapo"
    with pytest.raises(ConfigError, match="unknown variant 'ppo'"):
        variant_config(cfg, "ppo")


def test_a_variants_training_run_is_named_once_per_ablation_folder(tmp_path):
    """Ray Train continues a run found under the same name in ``run.output_dir/ray-train``: a variant keeps its name
    across calls with the same ``--out`` (a killed ablation resumes), and another ablation, or this one deleted and
    started again, gets a new one (before, ``ablate-<variant>`` handed it the old final checkpoint: no update ran)."""
    import shutil

    from anisora_ray.loop.ablate import storage_name

    first = storage_name(str(tmp_path / "a"), "reward=/x/my preset.yaml")
    assert first == storage_name(str(tmp_path / "a"), "reward=/x/my preset.yaml")
    assert "/" not in first and " " not in first
    assert storage_name(str(tmp_path / "b"), "reward=/x/my preset.yaml") != first
    shutil.rmtree(tmp_path / "a")
    assert storage_name(str(tmp_path / "a"), "reward=/x/my preset.yaml") != first
