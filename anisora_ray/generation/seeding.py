"""Per-candidate seeds: a pure function of (run seed, round, prompt id, candidate index)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from anisora_ray.config import AnisoraConfig
from anisora_ray.types import GenerationRequest, PromptItem

SEED_SPACE = 2**31 - 1


def candidate_seeds(run_seed: int, prompt_id: str, count: int, round_index: int = 0) -> list[int]:
    """``count`` distinct seeds for one prompt; the same arguments always give the same seeds."""
    seeds: list[int] = []
    attempt = 0
    while len(seeds) < count:
        digest = hashlib.sha256(f"{run_seed}:{round_index}:{prompt_id}:{attempt}".encode()).digest()
        seed = int.from_bytes(digest[:8], "big") % SEED_SPACE
        if seed not in seeds:
            seeds.append(seed)
        attempt += 1
    return seeds


def build_requests(items: Sequence[PromptItem], cfg: AnisoraConfig, round_index: int = 0) -> list[GenerationRequest]:
    k = cfg.generator.candidates_per_prompt
    return [
        GenerationRequest(item, tuple(candidate_seeds(cfg.run.seed, item.prompt_id, k, round_index)))
        for item in items
    ]
