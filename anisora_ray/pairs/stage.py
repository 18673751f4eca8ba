"""``anisora-ray pairs``: start (or reuse) the generator replicas and stream one round into pairs."""

from __future__ import annotations

import logging

from anisora_ray.config import AnisoraConfig
from anisora_ray.generation.replicas import GeneratorReplicas
from anisora_ray.io import fs
from anisora_ray.pairs.pipeline import PairsResult, stream_pairs
from anisora_ray.reward.actors import RewardActors
from anisora_ray.reward.base import check_reward_options

log = logging.getLogger(__name__)


def run_pairs(cfg: AnisoraConfig, prompts: str | None, out_uri: str | None, replicas: GeneratorReplicas | None = None,
              round_index: int = 0, progress: bool = True, reward_actors: RewardActors | None = None) -> PairsResult:
    """Pairs for every prompt of the manifest not yet paired at ``out_uri``.

    ``replicas`` / ``reward_actors``: persistent actors to use (kept running); when None, they are
    started for this call (reward actors only with ``pairs.reward_stage: actors``) and stopped after it.
    """
    from anisora_ray.data.manifest import read_manifest
    from anisora_ray.generation.stage import resolve_prompts
    from anisora_ray.models.pipeline import resolve_pretrained
    from anisora_ray.runtime import init_ray

    out_uri = fs.check_writable(fs.normalize(out_uri or fs.join(fs.normalize(cfg.run.output_dir), "pairs")), "the pairs output")
    items = read_manifest(resolve_prompts(cfg, prompts))  # bad manifests and options fail here, before Ray or models
    check_reward_options(cfg.reward)
    init_ray(cfg.ray)
    owned = replicas is None
    own_rewards = reward_actors is None and cfg.pairs.reward_stage == "actors"
    if owned:
        replicas = GeneratorReplicas(cfg, resolve_pretrained(cfg.model, cfg.generator))
    if own_rewards:
        reward_actors = RewardActors(cfg.reward)
    try:
        result = stream_pairs(cfg, items, replicas, out_uri, round_index, progress, reward_actors=reward_actors)
    finally:
        if owned:
            replicas.shutdown()
        if own_rewards:
            reward_actors.shutdown()
    if result.skipped:
        log.warning("skipped prompts by reason: %s (in %s/skipped-*.parquet)", result.skipped, out_uri)
    return result
