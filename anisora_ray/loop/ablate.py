"""``anisora-ray ablate``: what each ingredient of GAPO is worth, from one shared starting point.

Every variant trains once from the same round-0 generator on pairs made from the same candidates
(same prompts, same seeds), then is evaluated on the same held-out prompts and seeds:

- ``gapo``: the Diffusion-DPO loss weighted by the reward gain α^r̂w − α^r̂l (the method);
- ``dpo``: the same pairs without the gain (Diffusion-DPO);
- ``sft``: fit the winners only (supervised fine-tuning on the best candidates);
- ``no-<dimension>``: GAPO on pairs ranked with that dimension's weight set to 0 (a reward ablation:
  the candidates are generated again with the same seeds and ranked without it);
- ``reward=<preset>``: GAPO on pairs ranked by another reward, ``configs/reward/<preset>.yaml`` (or a YAML
  path) laid over the config's ``reward`` (and ``video``) sections, e.g. ``reward=videoscore`` (the paper's
  Table 4; its VideoScore weights, dtype, device and actor resources are the run's ``eval.videoscore`` ones when set).

Evaluation always uses the configured reward, the VBench-I2V-style metrics and VideoScore (``eval.videoscore``).
The tables (the paper's layout: a row per variant; then per metric, the gain over the untrained generator
with its CI, and the win rates over it) are ``<out>/ablation.md``;
``<out>`` is also an ``anisora-ray eval`` folder (``annotate serve --eval <out>`` works on it).
A second call with the same ``--out`` redoes nothing that finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import ConfigError
from anisora_ray.eval.versions import Version, evaluate_versions, version_rows
from anisora_ray.io import fs
from anisora_ray.reward.statistics import FILENAME as STATISTICS_FILE
from anisora_ray.reward.statistics import RewardStatistics, frozen_statistics, zscore_dimensions

log = logging.getLogger(__name__)

LOSSES = ("gapo", "dpo", "sft")
BASELINE = "round-0"


def reward_preset(name: str, root: str | None = None) -> str:
    """``configs/reward/<name>.yaml`` under ``root`` (default: the working directory), or ``name`` when it is a path."""
    import os

    path = name if name.endswith((".yaml", ".yml")) else os.path.join(root or os.getcwd(), "configs", "reward", f"{name}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"variant reward={name}: no reward preset {path!r} (configs/reward/<name>.yaml or a YAML path)")
    return path


def variant_config(cfg: AnisoraConfig, variant: str, root: str | None = None) -> tuple[AnisoraConfig, str]:
    """The config a variant trains with, and the key of the pairs it trains on ("full", "no-<dimension>" or
    "reward=<preset>")."""
    if variant.startswith("reward="):
        from anisora_ray.config.loading import _merge, _read_yaml, build_config

        raw = _read_yaml(Path(reward_preset(variant.removeprefix("reward="), root)))
        reward = _merge(cfg.reward.model_dump(), raw.get("reward") or {})
        vs = cfg.eval.videoscore
        for dim in reward["dimensions"].values():  # the run's VideoScore (eval.videoscore) ranks too, where it runs
            if dim.get("backend") == "videoscore" and vs.checkpoint:
                dim["options"] = {**dim.get("options", {}), "checkpoint": vs.checkpoint, "dtype": vs.dtype,
                                  "device": vs.device}
                dim["actor"] = {**dim.get("actor", {}), "num_cpus": vs.num_cpus, "num_gpus": vs.num_gpus}
        merged = build_config({**cfg.model_dump(), "reward": reward,
                               "video": _merge(cfg.video.model_dump(), raw.get("video") or {})}, variant)
        gapo = cfg.gapo.model_copy(update={"loss": "gapo"})
        return cfg.model_copy(update={"reward": merged.reward, "video": merged.video, "gapo": gapo}), variant
    if variant in LOSSES:
        return cfg.model_copy(update={"gapo": cfg.gapo.model_copy(update={"loss": variant})}), "full"
    if variant.startswith("no-"):
        name = variant[3:]
        dims = cfg.reward.dimensions.as_dict()
        if name not in dims:
            raise ConfigError(f"variant {variant!r}: no reward dimension {name!r} (dimensions: {sorted(dims)})")
        others = [d for d, spec in dims.items() if d != name and spec.weight > 0]
        if not others:
            raise ConfigError(f"variant {variant!r} leaves no dimension with a weight above 0")
        dimensions = cfg.reward.dimensions.model_copy(update={name: dims[name].model_copy(update={"weight": 0.0})})
        reward = cfg.reward.model_copy(update={"dimensions": dimensions})
        gapo = cfg.gapo.model_copy(update={"loss": "gapo"})
        return cfg.model_copy(update={"reward": reward, "gapo": gapo}), variant
    raise ConfigError(f"unknown variant {variant!r}: expected gapo, dpo, sft, no-<dimension> or reward=<preset>")


def _statistics(cfg: AnisoraConfig, out: str) -> RewardStatistics | None:
    """The configured statistics, else (when z-scoring) those the round-0 evaluation kept."""
    kept = fs.join(out, BASELINE, "eval", STATISTICS_FILE)
    zscored = zscore_dimensions(cfg.reward.dimensions.as_dict())
    return frozen_statistics(cfg.reward, kept if zscored and fs.exists(kept) else None)


def _pairs(cfg: AnisoraConfig, manifest: str, out_uri: str, statistics, progress: bool) -> str:
    from anisora_ray.pairs.stage import run_pairs

    done = fs.join(out_uri, "_DONE")
    if not fs.exists(done):
        run_pairs(cfg, manifest, out_uri, round_index=1, progress=progress, statistics=statistics)
        fs.write_bytes(done, b"")
    return out_uri


def storage_name(out: str, variant: str) -> str:
    """The Ray Train run of ``variant`` in the ablation ``out``: named once, on record in ``<out>/<variant>``, so a
    second call with the same ``--out`` continues its checkpoints and another ablation (another ``--out``, or this
    one deleted and started again) never picks them up (they all live under ``run.output_dir``)."""
    record = fs.join(out, variant, "training.json")
    if fs.exists(record):
        return json.loads(fs.read_bytes(record))["storage_name"]
    name = f"ablate-{re.sub(r'[^A-Za-z0-9_.-]+', '_', variant)}-{os.getpid()}-{time.time_ns()}"
    fs.write_bytes(record, json.dumps({"storage_name": name}).encode())
    return name


def _train(cfg: AnisoraConfig, variant: str, pairs_uri: str, out: str, root: str | None, parent_run_id: str) -> str:
    from anisora_ray.gapo.trainer import train_gapo
    from anisora_ray.pairs.writer import pairs_table

    record = fs.join(out, variant, "trained.json")
    if fs.exists(record):
        return json.loads(fs.read_bytes(record))["weights_uri"]
    log.info("%s: training (%s loss, %d updates) on %s", variant, cfg.gapo.loss, cfg.gapo.steps, pairs_uri)
    m = train_gapo(cfg, pairs_table(pairs_uri), fs.join(out, variant, "weights"), root=root,
                   run_name=f"ablate-{variant}", storage_name=storage_name(out, variant), parent_run_id=parent_run_id)
    summary = {"weights_uri": m["weights_uri"], "pairs_uri": pairs_uri, "loss": cfg.gapo.loss,
               **{f"train_{k}": float(m[k]) for k in ("loss", "dpo", "gain", "implicit_accuracy") if k in m}}
    fs.write_bytes(record, json.dumps(summary, indent=2).encode())
    return m["weights_uri"]


def run_ablation(cfg: AnisoraConfig, variants: list[str], out: str | None = None, root: str | None = None,
                 progress: bool = True) -> dict:
    """Train and evaluate every variant; returns the comparison (also ``<out>/ablation.{md,json}``)."""
    from anisora_ray.eval.compare import markdown_table, paper_table
    from anisora_ray.eval.heldout import heldout_items
    from anisora_ray.gapo.engine import deepspeed_config
    from anisora_ray.generation.stage import resolve_prompts
    from anisora_ray.loop.placement import check_cluster_fits
    from anisora_ray.pairs.stage import check_pairable
    from anisora_ray.reward.base import check_reward_options
    from anisora_ray.runtime import init_ray
    from anisora_ray.tracking import log_metrics, mlflow_run

    if not variants or len(set(variants)) != len(variants):
        raise ConfigError(f"--variants {variants}: name each variant once")
    configs = {v: variant_config(cfg, v, root) for v in variants}  # unknown variants fail here, before Ray
    out = fs.check_writable(fs.normalize(out or fs.join(fs.normalize(cfg.run.output_dir), "ablate")), "--out")
    manifest = resolve_prompts(cfg)
    heldout = heldout_items(cfg, manifest)
    check_pairable(cfg)
    for vcfg, _ in configs.values():
        check_reward_options(vcfg.reward)
        deepspeed_config(vcfg, root or os.getcwd())  # before Ray and round 0, not at the variant's training
    init_ray(cfg.ray)
    for vcfg, _ in [(cfg, None), *configs.values()]:  # a variant's reward may ask for more than the config's
        check_cluster_fits(vcfg)
    with mlflow_run(cfg, "ablate", tags={"anisora.stage": "ablate"}) as run:
        statistics = _statistics(cfg, out)
        log.info("round 0: held-out evaluation of the untrained generator")
        version_rows(cfg, Version(BASELINE, None), heldout, out, statistics, regenerate=False, progress=progress)
        statistics = statistics or _statistics(cfg, out)  # frozen from round 0 when z-scored
        pairs = {}
        for variant, (vcfg, key) in configs.items():
            if key not in pairs:
                log.info("pairs (%s reward) from the round-0 generator", "full" if key == "full" else key)
                # another reward (reward=<preset>) is not normalized with this one's statistics: its pairs calibrate
                # their own (or take the preset's reward.statistics_uri)
                own = statistics if key == "full" or key.startswith("no-") else None
                pairs[key] = _pairs(vcfg, manifest, fs.join(out, "pairs", key), own, progress)
        weights = {v: _train(vcfg, v, pairs[key], out, root, run.info.run_id) for v, (vcfg, key) in configs.items()}
        versions = [Version(BASELINE, None), *(Version(v, weights[v]) for v in variants)]
        comparison = evaluate_versions(cfg, versions, out, baseline=BASELINE, progress=progress, statistics=statistics)
        comparison["variants"] = {v: json.loads(fs.read_bytes(fs.join(out, v, "trained.json"))) for v in variants}
        table = paper_table(comparison) + "\n" + markdown_table(comparison, comparison["human"])
        table += (f"\nHuman study (2 of 3 annotators per comparison): `anisora-ray annotate serve --eval {out}`, then "
                  f"`anisora-ray annotate summarize --eval {out}`.\n")
        fs.write_bytes(fs.join(out, "ablation.md"), table.encode())
        fs.write_bytes(fs.join(out, "ablation.json"), json.dumps(comparison, indent=2, default=float).encode())
        for v in variants:
            c, key = comparison["versions"][v], re.sub(r"[^\w\-. /]", "_", v)  # MLflow's metric names: no "="
            log_metrics({f"{key}_{m}_gain": s["mean_diff"] for m, s in c["metrics"].items()}
                        | {f"{key}_reward_win_rate": c["reward_win_rate"]["win_rate"]})
        if not fs.is_url(out):
            import mlflow

            mlflow.log_artifact(fs.join(out, "ablation.md"))
            mlflow.log_artifact(fs.join(out, "ablation.json"))
        comparison["mlflow_run_id"] = run.info.run_id
    return comparison
