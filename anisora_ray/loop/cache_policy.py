"""What align does when the cache audit shows the step cache moving the pairs GAPO trains on.

Each audit (eval/cache_audit.py) says, per audited held-out prompt, whether the rollouts' cache keeps the prompt's
best and worst candidate, and how much of the exact pair's GAPO weight the cache's pair keeps (both weights from
the exact rewards). One audit has few prompts (a share in steps of 1/4 at 4 prompts), so the verdict pools every
audit so far: when the share of prompts that kept their pair falls below ``generator.cache.min_same_pair``, or the
share of GAPO signal kept below ``min_signal_kept``, it is recorded once in the job's state (``cache_verdict``, so a
resumed job keeps it) and ``on_moved_pairs`` acts:

- ``warn``: a warning and the ``anisora.cache`` tag on the job's MLflow run;
- ``exact``: every later rollout renders with every step computed (``rollouts_exact`` per round in MLflow), so GAPO
  trains on the weights' own pairs at the uncached cost. With ``loop.overlap`` the round already generated while the
  audited round trained keeps its cached pairs;
- ``stop``: the job stops before its next round with :class:`CacheDriftError`; change the cache (or the action) and
  ``--resume``.

The action is read from the config the job runs with, so a resumed job may change it; audits go on either way.
"""

from __future__ import annotations

import logging

from anisora_ray.config import AnisoraConfig
from anisora_ray.errors import CacheDriftError
from anisora_ray.eval.cache_audit import PairOutcome
from anisora_ray.io import fs
from anisora_ray.loop.state import AlignState

log = logging.getLogger(__name__)
TAG = "anisora.cache"


def record_audit(cfg: AnisoraConfig, state: AlignState, index: int, pairs: dict[str, PairOutcome],
                 parent_run_id: str = "") -> dict[str, float]:
    """Adds round ``index``'s audit (per prompt: its :class:`PairOutcome`) to the pooled counts and records the
    verdict when a pooled share falls below its threshold; returns ``cache_audit_same_pair_pooled`` (none before a
    prompt was audited) and ``cache_audit_signal_kept_pooled`` (none while every audited pair was a tie)."""
    state.cache_audits[str(index)] = [sum(o.kept for o in pairs.values()), len(pairs),  # a redone round replaces its own
                                      sum(o.signal_cached for o in pairs.values()),
                                      sum(o.signal_exact for o in pairs.values())]
    kept, audited = (sum(v[i] for v in state.cache_audits.values()) for i in (0, 1))
    if not audited:
        return {}
    # [kept, audited] entries of a job begun before the signal was counted pool in the same share only
    cached, exact = (sum(v[i] for v in state.cache_audits.values() if len(v) == 4) for i in (2, 3))
    pooled = {"same_pair": kept / audited, **({"signal_kept": cached / exact} if exact > 0 else {})}
    c = cfg.generator.cache
    below = [m for m, share in pooled.items() if share < getattr(c, f"min_{m}")]
    if below and not state.cache_verdict:
        state.cache_verdict = {"round": index, "measure": below[0], "kept": kept, "audited": audited,
                               **{f"{m}_pooled": share for m, share in pooled.items()},
                               "min_same_pair": c.min_same_pair, "min_signal_kept": c.min_signal_kept,
                               "action": c.on_moved_pairs}
        log.warning("round %d: the step cache (%s) moved the pairs GAPO trains on (%s): %s", index, c.kind,
                    explain(state.cache_verdict), describe(c.on_moved_pairs))
        if parent_run_id:
            import mlflow

            mlflow.MlflowClient().set_tag(parent_run_id, TAG, f"moved pairs at round {index} ({kept}/{audited} kept"
                                                              f"{_signal(pooled)}): {c.on_moved_pairs}")
    return {f"cache_audit_{m}_pooled": share for m, share in pooled.items()}


def _signal(pooled: dict[str, float]) -> str:
    return f", {pooled['signal_kept']:.0%} of the GAPO signal" if "signal_kept" in pooled else ""


def explain(verdict: dict) -> str:
    """Which pooled share fell below its threshold, in words (a verdict of a job begun before the signal was counted
    has the same-pair share only)."""
    moved = f"{verdict['audited'] - verdict['kept']} of {verdict['audited']} audited prompts changed their pair"
    if verdict.get("measure", "same_pair") == "same_pair":
        return (f"{moved}; same pair {verdict['same_pair_pooled']:.2f} < generator.cache.min_same_pair "
                f"{verdict['min_same_pair']:.2f}")
    return (f"{moved}; the cache's pairs keep {verdict['signal_kept_pooled']:.2f} of the exact pairs' GAPO signal < "
            f"generator.cache.min_signal_kept {verdict['min_signal_kept']:.2f}")


def describe(action: str) -> str:
    return {"warn": "warning only (on_moved_pairs: warn)",
            "exact": "later rollouts compute every step (on_moved_pairs: exact)",
            "stop": "the job stops before its next round (on_moved_pairs: stop)"}[action]


def action_in_force(cfg: AnisoraConfig, state: AlignState) -> str | None:
    """``on_moved_pairs`` of the config the job runs with, when a verdict stands and the cache is still on."""
    c = cfg.generator.cache
    return c.on_moved_pairs if state.cache_verdict and c.kind != "none" else None


def rollouts_exact(cfg: AnisoraConfig, state: AlignState) -> bool:
    """Whether this job's rollouts now compute every step (a verdict, and ``on_moved_pairs: exact``)."""
    return action_in_force(cfg, state) == "exact"


def check_go_on(cfg: AnisoraConfig, state: AlignState) -> None:
    """Before a round: raises :class:`CacheDriftError` when a verdict stands and the config still says ``stop``."""
    if action_in_force(cfg, state) != "stop":
        return
    c, v = cfg.generator.cache, state.cache_verdict
    raise CacheDriftError(
        f"the step cache (generator.cache.kind={c.kind!r}) moved the pairs by round {v['round']} ({explain(v)}). Set "
        "generator.cache.kind=none, loosen the cache, or generator.cache.on_moved_pairs=exact, then run again with "
        f"--resume (the rounds so far: anisora-ray report --run {fs.join(fs.normalize(cfg.run.output_dir), 'align')})")
