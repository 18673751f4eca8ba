"""``anisora-ray eval``: weights versions against a baseline on the held-out prompts and seeds.

A version is a round of an ``align`` job (``3``; ``0`` = the untrained generator) or a weights folder
(``name=path``; ``name=base`` = the untrained generator). Each version's held-out candidates are
generated with the same prompts and seeds as ``align``'s evaluation (a round ``align`` already
evaluated is reused, not generated again), scored by AnimeReward (z-scored dimensions with the job's
frozen round-0 statistics), by the VBench-style metrics and by VideoScore (``eval.videoscore``), and compared
with the baseline:
:mod:`anisora_ray.eval.compare`. Output, under ``--out``: ``<label>/eval/`` per version (candidates,
scores, ``video-metrics.parquet``), ``comparison.json``, ``comparison.md``; an answered human study
(``annotations.sqlite``, ``anisora-ray annotate serve --eval <out>``) adds the human win rate.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import ConfigError
from anisora_ray.eval.compare import compare_versions, markdown_table, paper_table
from anisora_ray.eval.vbench import (
    FORMS_FILE,
    MEASURES,
    METRICS_FILE,
    ensure_video_metrics,
    metric_forms,
    metrics_current,
)
from anisora_ray.eval.videoscore_eval import COLUMNS as VIDEOSCORE_COLUMNS
from anisora_ray.eval.videoscore_eval import FILE as VIDEOSCORE_FILE
from anisora_ray.eval.videoscore_eval import ensure_videoscore, merge_videoscore
from anisora_ray.io import fs
from anisora_ray.reward.statistics import FILENAME as STATISTICS_FILE
from anisora_ray.reward.statistics import RewardStatistics, frozen_statistics, zscore_dimensions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Version:
    label: str  # "round-3", or the name given on the command line
    weights_uri: str | None  # None: the untrained generator
    align_eval: str | None = None  # an align job's round-<r>/eval folder with this version's held-out candidates
    pruned: dict | None = None  # what the align job's run.keep deleted of this round (loop/retention.py)


def _align_state(run: str) -> dict:
    state_uri = fs.join(run, "state.json")
    if not fs.exists(state_uri):
        raise ConfigError(f"--run {run!r} has no state.json: give an align job's folder (<run.output_dir>/align)")
    return json.loads(fs.read_bytes(state_uri))


def resolve_versions(specs: list[str], run: str | None) -> list[Version]:
    """``specs``: round numbers of the ``run`` job, or ``name=path`` / ``name=base``."""
    state = _align_state(run) if run else None
    versions = []
    for spec in specs:
        name, eq, path = spec.partition("=")
        if eq:
            if not name or not path:
                raise ConfigError(f"version {spec!r}: expected name=path (or name=base)")
            if path != "base" and not fs.exists(path):
                raise ConfigError(f"version {name!r}: weights folder {path!r} does not exist")
            versions.append(Version(name, None if path == "base" else path))
            continue
        if not spec.isdigit():
            raise ConfigError(f"version {spec!r}: a round number of --run, or name=path")
        if state is None:
            raise ConfigError(f"version {spec!r} is a round number: give the align job with --run")
        index = int(spec)
        align_eval = fs.join(run, f"round-{index}", "eval")
        reuse = align_eval if fs.exists(fs.join(align_eval, "scores.parquet")) else None
        if index == 0:
            versions.append(Version("round-0", None, reuse))
            continue
        done = {r["index"]: r for r in state["rounds"] if r.get("weights_uri")}
        if index not in done:
            raise ConfigError(f"round {index} of {run} has no trained weights (rounds with weights: {sorted(done)})")
        versions.append(Version(f"round-{index}", done[index]["weights_uri"], reuse, done[index].get("pruned") or None))
    labels = [v.label for v in versions]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"versions {labels}: each label once")
    return versions


def job_statistics(cfg: AnisoraConfig, run: str | None):
    """The z-score statistics of the job (``reward.statistics_uri``, else those ``align`` froze at round 0)."""
    return frozen_statistics(cfg.reward, _align_state(run).get("statistics_uri") if run else None)


def _generate_and_score(cfg: AnisoraConfig, version: Version, heldout, out_dir: str, statistics, progress: bool,
                        resume: bool) -> None:
    from anisora_ray.eval.heldout import evaluate
    from anisora_ray.generation.replicas import GeneratorReplicas
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.reward.actors import RewardActors

    if version.pruned and "weights" in version.pruned:
        record = version.pruned["weights"]
        raise ConfigError(f"{version.label}: its weights were pruned at {record['at']} by {record['setting']}, so "
                          f"it cannot be generated again; its held-out scores are kept (evaluate it without "
                          f"--regenerate to read them back)")
    replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    rewards = None
    try:
        if version.weights_uri:
            replicas.refresh_from(version.weights_uri)
        rewards = RewardActors(cfg.reward)
        result = evaluate(cfg, heldout, replicas, rewards, out_dir, progress, statistics=statistics, resume=resume)
        if result.statistics is not None:  # what its z-scored dimensions were normalized with
            result.statistics.save(fs.join(out_dir, STATISTICS_FILE))
    finally:
        replicas.shutdown()
        if rewards is not None:
            rewards.shutdown()


def _require_videos_unless_measured(cfg: AnisoraConfig, version: Version, out_dir: str) -> None:
    """Measures not computed while the align job had the videos cannot be computed once run.keep pruned them."""
    record = (version.pruned or {}).get("eval_videos")
    needed = [name for name, ready, wanted in (
        (METRICS_FILE, metrics_current(out_dir, cfg.eval.metrics), cfg.eval.metrics.enabled),
        (VIDEOSCORE_FILE, fs.exists(fs.join(out_dir, VIDEOSCORE_FILE)), bool(cfg.eval.videoscore.checkpoint)))
        if wanted and not ready]
    if record and needed:
        raise ConfigError(f"{version.label}: its held-out videos were pruned at {record['at']} by {record['setting']}, "
                          f"and {needed} were not measured before; evaluate it with --regenerate (its weights "
                          f"generate the videos again) or without those measures")


def _check_reused(cfg: AnisoraConfig, version: Version, heldout, rows: list[dict], where: str) -> None:
    """Scores read back (an earlier ``eval`` in the same ``--out``, or the align job's) must be of this config's
    held-out prompts and seeds, and of this version's weights (``version.json`` beside them)."""
    from anisora_ray.eval.heldout import EVAL_ROUND
    from anisora_ray.generation.seeding import candidate_seeds

    k = cfg.eval.candidates_per_prompt
    expected = {(i.prompt_id, s) for i in heldout for s in candidate_seeds(cfg.run.seed, i.prompt_id, k, EVAL_ROUND)}
    found = {(r["prompt_id"], int(r["seed"])) for r in rows}
    per_prompt = max((sum(1 for p, _ in found if p == q) for q in {p for p, _ in found}), default=0)
    problem = None
    if found - expected:
        problem = (f"{len(found - expected)} of its {len(found)} candidates are of other prompts or seeds (another "
                   "held-out set, run.seed or eval.candidates_per_prompt)")
    elif per_prompt < k:
        problem = f"it has {per_prompt} seed(s) per prompt at most, this config's eval.candidates_per_prompt is {k}"
    made = fs.join(where, "version.json")
    if problem is None and fs.exists(made):
        recorded = json.loads(fs.read_bytes(made)).get("weights_uri")
        if recorded != version.weights_uri:
            problem = f"it was generated from weights {recorded or 'base'}, this version names {version.weights_uri or 'base'}"
    if problem:
        raise ConfigError(f"{version.label}: the held-out scores in {where} are not this run's: {problem}; evaluate "
                          "with --regenerate (the weights render them again), another --out, or the config they "
                          "were made with")


def version_rows(cfg: AnisoraConfig, version: Version, heldout, out: str, statistics, regenerate: bool,
                 progress: bool) -> list[dict]:
    """The version's held-out candidates with AnimeReward and the video metrics (computed once, then read back;
    what is read back is checked to be of this config's prompts and seeds and of the version's weights)."""
    out_dir = fs.join(out, version.label, "eval")
    scores_uri = fs.join(out_dir, "scores.parquet")
    if fs.exists(scores_uri) and not regenerate:
        _check_reused(cfg, version, heldout, fs.read_table(scores_uri).to_pylist(), out_dir)
    if regenerate or not fs.exists(scores_uri):
        if version.align_eval and not regenerate:
            _check_reused(cfg, version, heldout, fs.read_table(fs.join(version.align_eval, "scores.parquet")).to_pylist(),
                          version.align_eval)
            fs.makedirs(out_dir)
            for name in ("candidates.parquet", "scores.parquet", METRICS_FILE, FORMS_FILE):  # the last two: the guard's
                if fs.exists(fs.join(version.align_eval, name)):
                    fs.write_bytes(fs.join(out_dir, name), fs.read_bytes(fs.join(version.align_eval, name)))
            log.info("%s: held-out candidates of %s reused", version.label, version.align_eval)
            _require_videos_unless_measured(cfg, version, out_dir)
        else:
            log.info("%s: generating and scoring the held-out candidates", version.label)
            _generate_and_score(cfg, version, heldout, out_dir, statistics, progress, resume=not regenerate)
        fs.write_bytes(fs.join(out_dir, "version.json"), json.dumps({"weights_uri": version.weights_uri}).encode())
    rows = fs.read_table(scores_uri).to_pylist()
    videoscore = ensure_videoscore(out_dir, cfg.eval.videoscore, regenerate)
    if videoscore:
        merge_videoscore(rows, videoscore)
    if cfg.eval.metrics.enabled:
        metrics_uri = ensure_video_metrics(out_dir, cfg.eval.metrics, regenerate)
        extra = {(r["prompt_id"], int(r["seed"])): r for r in fs.read_table(metrics_uri).to_pylist()}
        for r in rows:
            found = extra.get((r["prompt_id"], int(r["seed"])), {})
            r.update({k: found.get(k, math.nan) for k in MEASURES})
    return rows


def human_results(out: str, baseline: str) -> dict[str, dict]:
    """Per version label, the summary of the answered study against ``baseline`` in ``<out>/annotations.sqlite``."""
    from anisora_ray.eval.annotate import AnnotationStore, summarize

    db = os.path.join(fs.normalize(out), "annotations.sqlite")
    if fs.is_url(out) or not os.path.isfile(db):
        return {}
    store = AnnotationStore(db)
    labels = {c["left_label"] for c in store.comparisons()} | {c["right_label"] for c in store.comparisons()}
    return {label: summarize(store, trained=label, baseline=baseline) for label in sorted(labels - {baseline})}


def evaluate_versions(cfg: AnisoraConfig, versions: list[Version], out: str, baseline: str | None = None,
                      run: str | None = None, regenerate: bool = False, progress: bool = True,
                      statistics=None) -> dict:
    """Evaluate every version and compare each with ``baseline`` (default: the first); writes and returns
    the comparison (``comparison.json``, ``comparison.md`` under ``out``). z-scored dimensions use
    ``statistics``, else the job's (``run``), else those of the baseline's candidates (evaluated first)."""
    from anisora_ray.eval.heldout import heldout_items
    from anisora_ray.generation.stage import resolve_prompts
    from anisora_ray.reward.aggregate import active_dimensions
    from anisora_ray.reward.base import check_reward_options
    from anisora_ray.runtime import init_ray

    if len(versions) < 2:
        raise ConfigError("eval needs two versions or more (a baseline and what to compare with it)")
    baseline = baseline or versions[0].label
    if baseline not in {v.label for v in versions}:
        raise ConfigError(f"--baseline {baseline!r} is not among the versions {[v.label for v in versions]}")
    out = fs.check_writable(fs.normalize(out), "--out")
    heldout = heldout_items(cfg, resolve_prompts(cfg))
    check_reward_options(cfg.reward)
    statistics = statistics or job_statistics(cfg, run)
    init_ray(cfg.ray)
    ordered = sorted(versions, key=lambda v: v.label != baseline)  # the baseline first: it may fix the statistics
    tables = {}
    for v in ordered:
        tables[v.label] = version_rows(cfg, v, heldout, out, statistics, regenerate, progress)
        kept = fs.join(out, v.label, "eval", STATISTICS_FILE)
        if statistics is None and zscore_dimensions(cfg.reward.dimensions.as_dict()) and fs.exists(kept):
            statistics = RewardStatistics.load(kept)
    tables = {v.label: tables[v.label] for v in versions}
    dims = list(active_dimensions(cfg.reward.dimensions.as_dict()))
    metrics = ["reward", *dims, *(MEASURES if cfg.eval.metrics.enabled else ()),
               *(VIDEOSCORE_COLUMNS if cfg.eval.videoscore.checkpoint else ())]
    comparison = compare_versions(tables, baseline, metrics, samples=cfg.eval.bootstrap_samples, seed=cfg.run.seed)
    comparison["forms"] = metric_forms(cfg.eval.metrics)
    if cfg.eval.videoscore.checkpoint:
        comparison["forms"]["videoscore"] = f"VideoScore ({cfg.eval.videoscore.checkpoint}), five aspects on ~1-4"
    comparison["weights"] = {v.label: v.weights_uri for v in versions}
    comparison["human"] = human_results(out, baseline)
    fs.write_bytes(fs.join(out, "comparison.json"), json.dumps(comparison, indent=2, default=float).encode())
    fs.write_bytes(fs.join(out, "comparison.md"),
                   (paper_table(comparison) + "\n" + markdown_table(comparison, comparison["human"])).encode())
    return comparison
