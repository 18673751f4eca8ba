"""Held-out evaluation: the current replicas generate for prompts never trained on, AnimeReward scores them.

Every round uses the same held-out prompts and the same seeds (common random numbers), so the
difference between two rounds is the generator's doing, and a paired test over prompts applies.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

from anisora_ray.config import AnisoraConfig
from anisora_ray.data.manifest import read_manifest
from anisora_ray.errors import ConfigError
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.generation.stage import generate_candidates
from anisora_ray.io import fs
from anisora_ray.reward.actors import RewardActors
from anisora_ray.reward.aggregate import active_dimensions
from anisora_ray.reward.stage import score_candidates, scores_table
from anisora_ray.reward.statistics import RewardStatistics
from anisora_ray.types import PromptItem

log = logging.getLogger(__name__)

EVAL_ROUND = 1_000_000  # seed namespace of the held-out candidates: distinct from training rounds, fixed


@dataclass(frozen=True)
class EvalResult:
    per_prompt: dict[str, float]  # prompt_id -> mean reward of its candidates
    dimensions: dict[str, float]  # dimension -> mean normalized score
    mean_reward: float
    scores_uri: str
    candidates: int
    quarantined: int
    weights_version: int
    statistics: RewardStatistics | None = None  # what the zscore dimensions were normalized with
    per_candidate: dict[str, dict[str, float]] = field(default_factory=dict)  # prompt_id -> seed -> reward

    def metrics(self, prefix: str = "heldout") -> dict[str, float]:
        return {f"{prefix}_reward": self.mean_reward, **{f"{prefix}_{k}": v for k, v in self.dimensions.items()},
                f"{prefix}_quarantined": float(self.quarantined)}


def heldout_items(cfg: AnisoraConfig, train_manifest: str) -> list[PromptItem]:
    """The held-out prompts; an error if any image or prompt id also appears in the training manifest."""
    from anisora_ray.data.demo import ensure_demo_set
    from anisora_ray.data.manifest import require_prompts

    e = cfg.eval
    uri = e.prompts
    require_prompts(train_manifest, uri)
    if uri == "demo":
        out = fs.join(fs.normalize(cfg.run.output_dir), "heldout")
        uri = ensure_demo_set(out, e.demo_prompts, cfg.data.demo_image_size, cfg.run.seed + e.seed_offset, prefix="heldout",
                              settings="eval.demo_prompts, data.demo_image_size, run.seed + eval.seed_offset")
    items = read_manifest(uri)
    train = read_manifest(train_manifest)
    shared_ids = {i.prompt_id for i in items} & {t.prompt_id for t in train}
    shared_images = {i.image_uri for i in items} & {t.image_uri for t in train}
    if shared_ids or shared_images:
        raise ConfigError(f"eval.prompts {e.prompts!r} overlaps the training prompts "
                          f"({sorted(shared_ids)[:3]} ids, {sorted(shared_images)[:3]} images): held-out must be unseen")
    caveat = rank_caveat(cfg)
    if caveat:
        log.warning(caveat)
    return items


def rank_caveat(cfg: AnisoraConfig) -> str | None:
    """What a ``rank``-normalized dimension means for the held-out evaluation (None: there is none)."""
    ranked = [n for n, d in cfg.reward.dimensions.as_dict().items() if d.weight > 0 and d.normalize.kind == "rank"]
    if not ranked:
        return None
    return (f"reward dimension(s) {ranked} normalize by rank: the held-out evaluation ranks a version's candidates "
            "among themselves, so each scores 0.5 on average in every version, and held-out gains, the guard's "
            "reward rise and eval's comparisons come from the other dimensions only (zscore, frozen at round 0, or "
            "fixed keep a dimension comparable across versions)")


def evaluate(cfg: AnisoraConfig, items: list[PromptItem], replicas: GeneratorReplicas, reward_actors: RewardActors,
             out_dir: str, progress: bool = True, statistics: RewardStatistics | None = None,
             resume: bool = True) -> EvalResult:
    """Generate ``eval.candidates_per_prompt`` videos per held-out prompt with the replicas' current weights
    (``eval.exact``: every step computed, whatever ``generator.cache``), score them, and average per prompt and per
    dimension. z-scored dimensions use ``statistics`` (align passes those frozen at round 0, so gains show);
    without them, this set's own. ``resume``: videos an interrupted evaluation of the same weights and settings
    rendered into ``out_dir`` are kept (``generation/journal.py``), the rest rendered."""
    eval_cfg = cfg.model_copy(update={"generator": cfg.generator.model_copy(
        update={"candidates_per_prompt": cfg.eval.candidates_per_prompt})})
    generated = generate_candidates(eval_cfg, items, out_dir, replicas, round_index=EVAL_ROUND, progress=progress,
                                    exact=cfg.eval.exact, resume=resume)
    versions = {c.weights_version for c in generated.candidates}
    if len(versions) > 1:
        raise RuntimeError(f"held-out candidates came from several weights versions {sorted(versions)}")
    scoring = score_candidates(cfg, generated.candidates, reward_actors, progress=progress, statistics=statistics)
    scored = scoring.scored
    dims = active_dimensions(cfg.reward.dimensions.as_dict())
    scores_uri = fs.join(out_dir, "scores.parquet")
    fs.write_table(scores_table(scored, dims), scores_uri)
    rewards: dict[str, list[float]] = defaultdict(list)
    per_candidate: dict[str, dict[str, float]] = defaultdict(dict)
    per_dim: dict[str, list[float]] = defaultdict(list)
    valid = [s for s in scored if not s.quarantine_reason and math.isfinite(s.reward)]
    for s in valid:
        rewards[s.prompt_id].append(s.reward)
        per_candidate[s.prompt_id][str(int(s.seed))] = s.reward
        for name in dims:
            per_dim[name].append(s.scores[name])
    if not valid:
        raise RuntimeError(f"no held-out candidate could be scored (see {scores_uri})")
    per_prompt = {k: sum(v) / len(v) for k, v in rewards.items()}
    return EvalResult(
        per_prompt=per_prompt, dimensions={k: sum(v) / len(v) for k, v in per_dim.items()},
        mean_reward=sum(per_prompt.values()) / len(per_prompt), scores_uri=scores_uri,
        candidates=len(scored) + len(generated.quarantined), quarantined=len(scored) - len(valid) + len(generated.quarantined),
        weights_version=versions.pop() if versions else -1, statistics=scoring.statistics,
        per_candidate=dict(per_candidate))
