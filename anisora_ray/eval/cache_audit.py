"""The cache audit: how far ``generator.cache`` moves the rollouts of the weights being trained.

A step cache's saving is fixed by its schedule, but what it does to the videos depends on the weights: the drift
measured on random-init weights (docs/performance.md) says nothing of a trained checkpoint's. So at round 0 and
every ``generator.cache.audit_every`` rounds, the first ``audit_prompts`` held-out prompts get a rollout's
``generator.candidates_per_prompt`` seeds (in the evaluation's seed namespace: its seeds come first), each rendered
twice on the replicas, with the cache and with every step computed (``Generator.audit``: the same replica, hooks and
compiled graphs), and both sets are scored together. Per video: the frames' drift (raw frames, before the codec)
and the reward's change. Per prompt: whether the cache keeps its best and its worst candidate, the pair GAPO would
train on, and how much of that pair's GAPO signal the cache's pair keeps (:class:`PairOutcome`): a near-tie the
cache swaps loses little of it, an inverted pair more than all.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass

from anisora_ray.config import AnisoraConfig
from anisora_ray.eval.heldout import EVAL_ROUND
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.generation.seeding import build_requests
from anisora_ray.io import fs
from anisora_ray.reward.actors import RewardActors
from anisora_ray.reward.stage import score_candidates
from anisora_ray.reward.statistics import RewardStatistics
from anisora_ray.types import PromptItem

log = logging.getLogger(__name__)
AUDIT_DIR = "cache_audit"  # under a round's eval folder
AUDIT_KINDS = ("cached", "exact")  # its two renderings, each in a folder of that name (Generator.audit)
AUDIT_FILE = "cache_audit.parquet"
AUDIT_SIDE_BY_SIDE = "side_by_side"  # the most-moved video both ways in one mp4 (loop/samples.py: MLflow)


def audit_due(cfg: AnisoraConfig, round_index: int) -> bool:
    """Whether the held-out evaluation of ``round_index`` (0: the untrained generator) runs the cache audit."""
    c = cfg.generator.cache
    return c.kind != "none" and c.audit_prompts > 0 and round_index % c.audit_every == 0


@dataclass(frozen=True)
class PairOutcome:
    """One audited prompt's pair. GAPO weighs a pair by ``alpha**r_w - alpha**r_l``; both signals are that weight
    computed with the *exact* rewards: of the exact pair (>= 0), and of the pair the cache's rewards pick (negative
    when the cache inverts the pair)."""

    kept: bool  # the cache picks the exact best and worst candidate
    signal_exact: float
    signal_cached: float


@dataclass(frozen=True)
class CacheAudit:
    rows: list[dict]  # per video: prompt_id, seed, drift (levels, PSNR), reward with the cache and exact
    pairs: dict[str, PairOutcome]  # per prompt with two or more videos scored both ways
    quarantined: int
    uri: str

    def metrics(self, prefix: str = "cache_audit") -> dict[str, float]:
        scored = [r for r in self.rows if math.isfinite(r["reward_change"])]
        out = {f"{prefix}_videos": float(len(self.rows)), f"{prefix}_quarantined": float(self.quarantined)}
        if self.rows:
            mse = sum(r["mse"] for r in self.rows) / len(self.rows)
            out[f"{prefix}_drift_mean_levels"] = sum(r["drift_mean_levels"] for r in self.rows) / len(self.rows)
            out[f"{prefix}_drift_max_levels"] = max(r["drift_max_levels"] for r in self.rows)
            if mse > 0:  # equal frames everywhere: no PSNR to log (MLflow takes no infinity)
                out[f"{prefix}_psnr_db"] = 10 * math.log10(255.0**2 / mse)
        if scored:
            out[f"{prefix}_reward_change"] = sum(r["reward_change"] for r in scored) / len(scored)
            out[f"{prefix}_reward_abs_change"] = sum(abs(r["reward_change"]) for r in scored) / len(scored)
        if self.pairs:
            out[f"{prefix}_same_pair"] = sum(o.kept for o in self.pairs.values()) / len(self.pairs)
        exact = sum(o.signal_exact for o in self.pairs.values())
        if exact > 0:  # all ties: no signal to keep
            out[f"{prefix}_signal_kept"] = sum(o.signal_cached for o in self.pairs.values()) / exact
        return out


def audit_cache(cfg: AnisoraConfig, items: list[PromptItem], replicas: GeneratorReplicas, reward_actors: RewardActors,
                out_dir: str, statistics: RewardStatistics | None = None, progress: bool = True) -> CacheAudit:
    """Render, score and compare (module docstring); writes ``cache_audit.parquet`` (one row per video) in
    ``out_dir``, the videos under ``out_dir``/cached and ``out_dir``/exact."""
    c = cfg.generator.cache
    # a rollout's K candidates per prompt (its best and worst are a pair), at held-out seeds: the evaluation's first
    requests = build_requests(items[: c.audit_prompts], cfg, EVAL_ROUND)
    cached, exact, drift, quarantined = replicas.audit(requests, out_dir)
    scored = score_candidates(cfg, cached + exact, reward_actors, progress=progress, statistics=statistics).scored
    reward = {s.video_uri: s.reward if not s.quarantine_reason else float("nan") for s in scored}
    twins = {(k.prompt_id, k.seed): (k, e) for k, e in zip(cached, exact, strict=True)}
    rows = []
    for d in drift:
        k, e = twins[(d["prompt_id"], d["seed"])]
        with_cache, without = reward.get(k.video_uri, float("nan")), reward.get(e.video_uri, float("nan"))
        rows.append({**d, "reward_cached": with_cache, "reward_exact": without,
                     "reward_change": with_cache - without, "video_cached": k.video_uri, "video_exact": e.video_uri,
                     "frames_sha256_cached": k.frames_sha256, "frames_sha256_exact": e.frames_sha256})
    pairs = pair_outcomes(rows, cfg.gapo.alpha)
    uri = fs.join(out_dir, AUDIT_FILE)
    import pyarrow as pa

    def prompt_columns(prompt_id: str) -> dict:  # a prompt without a pair to compare: None and NaN
        o = pairs.get(prompt_id)
        return {"same_pair": o.kept if o else None, "pair_signal_exact": o.signal_exact if o else math.nan,
                "pair_signal_cached": o.signal_cached if o else math.nan}

    fs.write_table(pa.Table.from_pylist([{**r, **prompt_columns(r["prompt_id"])} for r in rows]), uri)
    audit = CacheAudit(rows, pairs, len(quarantined), uri)
    m = audit.metrics()
    log.info("cache audit (%s, %d videos): drift %.2f levels (max %.0f), reward change %+.4f, same pair %s, GAPO "
             "signal kept %s; %s", c.kind, len(rows), m.get("cache_audit_drift_mean_levels", 0.0),
             m.get("cache_audit_drift_max_levels", 0.0), m.get("cache_audit_reward_change", float("nan")),
             m.get("cache_audit_same_pair", "n/a"), m.get("cache_audit_signal_kept", "n/a"), uri)
    return audit


def pair_outcomes(rows: list[dict], alpha: float) -> dict[str, PairOutcome]:
    """Per prompt with two or more videos scored both ways: whether the cache's rewards pick the best and the
    worst seed the exact rewards pick (ranked as pairs/select.py ranks: by reward, then the lower seed first), and
    the GAPO weight (``alpha``, gapo.alpha) of the exact pair and of the cache's pair, both from the exact rewards."""
    seeds: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if math.isfinite(r["reward_cached"]) and math.isfinite(r["reward_exact"]):
            seeds[r["prompt_id"]].append(r)

    def pair(group: list[dict], key: str) -> tuple[dict, dict]:
        ordered = sorted(group, key=lambda r: (r[key], -r["seed"]))
        return ordered[-1], ordered[0]

    def signal(winner: dict, loser: dict) -> float:
        return alpha ** winner["reward_exact"] - alpha ** loser["reward_exact"]

    out = {}
    for prompt, group in seeds.items():
        if len(group) >= 2:
            (we, le), (wc, lc) = pair(group, "reward_exact"), pair(group, "reward_cached")
            out[prompt] = PairOutcome((wc["seed"], lc["seed"]) == (we["seed"], le["seed"]), signal(we, le), signal(wc, lc))
    return out
