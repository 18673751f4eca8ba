"""Per prompt: the best and the worst scored candidate form a preference pair, or the prompt is skipped."""

from __future__ import annotations

from collections.abc import Sequence

from anisora_ray.config import PairsConfig
from anisora_ray.types import PreferencePair, QuarantineRecord, ScoredCandidate


def skipped(prompt_id: str, reason: str, detail: str) -> QuarantineRecord:
    return QuarantineRecord(stage="pairs", item_id=prompt_id, reason=reason, detail=detail)


def select_pair(prompt_id: str, candidates: Sequence[ScoredCandidate], rules: PairsConfig) -> PreferencePair | QuarantineRecord:
    """The pair of ``candidates`` (one prompt's), or a skip record saying why there is none."""
    valid = [c for c in candidates if not c.quarantine_reason and c.reward == c.reward]  # NaN != NaN
    if len(valid) < 2:
        reasons = sorted({c.quarantine_reason for c in candidates if c.quarantine_reason})
        return skipped(prompt_id, "fewer than two valid candidates",
                       f"{len(valid)} of {len(candidates)} valid; " + "; ".join(reasons)[:1800])
    ranked = sorted(valid, key=lambda c: (-c.reward, c.seed))  # deterministic under equal rewards
    winner, loser = ranked[0], ranked[-1]
    gap = winner.reward - loser.reward
    if gap == 0 and rules.ties == "skip":
        return skipped(prompt_id, "tie", f"all {len(valid)} valid candidates have reward {winner.reward:.6f}")
    if gap < rules.min_gap:
        return skipped(prompt_id, "gap below min_gap", f"gap {gap:.6f} < min_gap {rules.min_gap}")
    return PreferencePair(
        prompt_id=prompt_id,
        prompt=winner.prompt,
        image_uri=winner.image_uri,
        winner_video_uri=winner.video_uri,
        loser_video_uri=loser.video_uri,
        winner_seed=winner.seed,
        loser_seed=loser.seed,
        winner_reward=winner.reward,
        loser_reward=loser.reward,
        reward_gap=gap,
        weights_version=winner.weights_version,
        winner_scores=dict(winner.scores),
        loser_scores=dict(loser.scores),
    )
