"""What align does when the cache audit shows the step cache moving the pairs GAPO trains on.

Each audit (eval/cache_audit.py) says, per audited held-out prompt, whether the rollouts' cache keeps the prompt's
best and worst candidate. One audit has few prompts (a share in steps of 1/4 at 4 prompts), so the verdict pools
every audit so far: when the share that kept their pair falls below ``generator.cache.min_same_pair``, it is
recorded once in the job's state (``cache_verdict``, so a resumed job keeps it) and ``on_moved_pairs`` acts:

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
from anisora_ray.io import fs
from anisora_ray.loop.state import AlignState

log = logging.getLogger(__name__)
TAG = "anisora.cache"


def record_audit(cfg: AnisoraConfig, state: AlignState, index: int, same_pair: dict[str, bool],
                 parent_run_id: str = "") -> dict[str, float]:
    """Adds round ``index``'s audit (prompt -> kept its pair) to the pooled count, records the verdict when the pooled
    share falls below ``min_same_pair``; returns ``cache_audit_same_pair_pooled`` (none before a prompt was audited)."""
    state.cache_audits[str(index)] = [sum(same_pair.values()), len(same_pair)]  # a redone round replaces its own
    kept, audited = (sum(v[i] for v in state.cache_audits.values()) for i in (0, 1))
    if not audited:
        return {}
    pooled = kept / audited
    c = cfg.generator.cache
    if pooled < c.min_same_pair and not state.cache_verdict:
        state.cache_verdict = {"round": index, "same_pair_pooled": pooled, "kept": kept, "audited": audited,
                               "min_same_pair": c.min_same_pair, "action": c.on_moved_pairs}
        log.warning("round %d: the step cache (%s) moved the pairs of %d of %d audited prompts (same pair %.2f < "
                    "generator.cache.min_same_pair %.2f): %s", index, c.kind, audited - kept, audited, pooled,
                    c.min_same_pair, describe(c.on_moved_pairs))
        if parent_run_id:
            import mlflow

            mlflow.MlflowClient().set_tag(parent_run_id, TAG, f"moved pairs at round {index} ({kept}/{audited} kept): "
                                                              f"{c.on_moved_pairs}")
    return {"cache_audit_same_pair_pooled": pooled}


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
        f"the step cache (generator.cache.kind={c.kind!r}) moved the pairs of {v['audited'] - v['kept']} of "
        f"{v['audited']} audited prompts by round {v['round']} (same pair {v['same_pair_pooled']:.2f} < "
        f"generator.cache.min_same_pair {v['min_same_pair']:.2f}). Set generator.cache.kind=none, loosen the "
        "cache, or generator.cache.on_moved_pairs=exact, then run again with --resume (the rounds so far: "
        f"anisora-ray report --run {fs.join(fs.normalize(cfg.run.output_dir), 'align')})")
