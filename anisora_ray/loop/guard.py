"""The reward-hacking guard inside ``align``: measure every held-out evaluation, decide, roll back.

After each round's held-out evaluation the guard measures (``loop.guard.measures``, see
:mod:`anisora_ray.eval.guard`) are computed on the same held-out videos and logged beside the
reward (``guard_<measure>``). When the round's held-out reward rose over round 0 while a measure
fell beyond the margin (paired test over prompts), ``loop.guard.action`` decides: ``warn`` logs it;
``stop`` ends the loop after this round; ``rollback`` also returns the replicas to the best round's
weights (the highest held-out reward among rounds the guard passed, round 0 = the untrained
generator) and points the registered model's ``best`` alias at them. The decision and its evidence
go to ``state.json``, ``align/guard.json`` and the parent MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter

from anisora_ray.config import AnisoraConfig
from anisora_ray.eval.compare import paired_means, prompt_mean, scored
from anisora_ray.eval.guard import check_guard
from anisora_ray.eval.vbench import ensure_video_metrics
from anisora_ray.io import fs

log = logging.getLogger(__name__)


def measure_round(cfg: AnisoraConfig, eval_dir: str) -> dict[str, dict[str, dict[str, float]]]:
    """measure → prompt id → seed (as text: the state is JSON) → the candidate's value (computed once per eval
    folder); :func:`decide` compares the seeds both rounds measured."""
    uri = ensure_video_metrics(eval_dir, cfg.eval.metrics)
    rows = fs.read_table(uri).to_pylist()
    measured = {}
    for m in cfg.loop.guard.measures:
        by_prompt: dict[str, dict[str, float]] = {}
        for (prompt, seed), value in scored(rows, m).items():
            by_prompt.setdefault(prompt, {})[str(seed)] = value
        measured[m] = by_prompt
    empty = [m for m, by_prompt in measured.items() if not by_prompt]
    if empty:  # said, not skipped in silence: the guard cannot fire on a measure it has no values of
        errors = Counter(str(r["metrics_error"])[:200] for r in rows if r.get("metrics_error"))
        log.warning("guard: no held-out video could be measured for %s in %s, so the guard cannot fire on it (%s)",
                    empty, uri, "; ".join(f"{n} video(s): {e}" for e, n in errors.most_common(3)) or "no finite value")
    return {m: by_prompt for m, by_prompt in measured.items() if by_prompt}


def means(measures: dict) -> dict[str, float]:
    """``guard_<measure>``: the mean over prompts of each prompt's mean (every seed measured; logged beside the reward)."""
    out = {}
    for m, by_prompt in measures.items():
        prompt_means = [x for x in (prompt_mean(v) for v in by_prompt.values()) if math.isfinite(x)]
        if prompt_means:
            out[f"guard_{m}"] = sum(prompt_means) / len(prompt_means)
    return out


def paired_measures(baseline: dict, current: dict) -> tuple[dict, dict]:
    """Per measure, the two rounds' per-prompt means over the seeds both measured (``eval.compare.paired_means``)."""
    pairs = {m: paired_means(base, current.get(m, {})) for m, base in baseline.items()}
    return {m: p[0] for m, p in pairs.items()}, {m: p[1] for m, p in pairs.items()}


def stand_ins(cfg: AnisoraConfig) -> dict[str, str]:
    """Guard measures computed by a weight-free stand-in for a learned VBench metric (no backbone configured):
    measure → why. Evidence from them alone makes the guard warn, not stop or roll back."""
    m = cfg.eval.metrics
    out = {}
    if not m.subject_backbone:
        out["subject_consistency"] = "pixel thumbnails stand in for DINO features (eval.metrics.subject_backbone unset)"
    if not m.aesthetic_head:
        out["aesthetic_quality"] = "classical appeal stands in for the LAION predictor (eval.metrics.aesthetic_head unset)"
    return out


def decide(cfg: AnisoraConfig, baseline: dict, current: dict, row: dict, index: int) -> dict:
    """The guard's verdict for round ``index``: ``fired``, the action taken and the per-measure evidence. When
    every measure that fell is a weight-free stand-in (:func:`stand_ins`), ``stop``/``rollback`` become ``warn``,
    and the verdict says why."""
    g = cfg.loop.guard
    fired, findings = check_guard(*paired_measures(baseline, current), reward_gain=row.get("mean_diff", 0.0),
                                  margin=g.margin, alpha=g.alpha, samples=cfg.eval.bootstrap_samples, seed=cfg.run.seed)
    verdict = {"round": index, "fired": fired, "action": g.action if fired else "none",
               "reward_gain": row.get("mean_diff", math.nan), "findings": [f.to_dict() for f in findings]}
    # the exact sign-flip test's smallest two-sided p is 2 / 2^n: with too few prompts no fall can be significant
    mute = sorted(f.measure for f in findings if f.num_prompts <= 16 and 2.0 / 2 ** f.num_prompts >= g.alpha)
    if mute:
        verdict["cannot_fire"] = mute
        log.warning("round %d: the guard cannot fire on %s: too few held-out prompts with a value (p >= 2/2^n >= "
                    "loop.guard.alpha %g; 6 or more at 0.05)", index, mute, g.alpha)
    if fired:
        fell = [f for f in findings if f.fell]
        weak = stand_ins(cfg)
        if g.action != "warn" and all(f.measure in weak for f in fell):
            verdict["action"] = "warn"
            verdict["downgraded"] = (f"{g.action} downgraded to warn: only weight-free stand-ins fell ("
                                     + "; ".join(weak[f.measure] for f in fell) + ")")
        log.warning("round %d: guard fired: held-out reward %+.4f over round 0 while %s (action: %s)%s", index,
                    verdict["reward_gain"], ", ".join(f"{f.measure} {f.before:.4f} -> {f.after:.4f} (p={f.p_value:.3f}, "
                                                      f"beside {f.guards})" for f in fell), verdict["action"],
                    f"; {verdict['downgraded']}" if "downgraded" in verdict else "")
    return verdict


def best_round(rows: list[dict], flagged: set[int]) -> int:
    """The round with the highest held-out reward among those the guard passed (0: the untrained generator)."""
    passed = [r for r in rows if r["round"] not in flagged]
    return max(passed, key=lambda r: (r["heldout_reward"], -r["round"]))["round"]


def set_best_alias(name: str, version: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().set_registered_model_alias(name, "best", version)
    except MlflowException as exc:  # bookkeeping: the rollback itself is done
        log.warning("model %r version %s not given the alias 'best': %s", name, version, str(exc).splitlines()[0][:300])


def record(out: str, verdict: dict, run_id: str) -> str:
    """Write the verdict (``guard.json``) and log it to MLflow run ``run_id`` (the job's, whichever run is active:
    the round's when the verdict is made); returns the file."""
    from mlflow.tracking import MlflowClient

    uri = fs.join(out, "guard.json")
    fs.write_bytes(uri, json.dumps(verdict, indent=2, default=float).encode())
    client = MlflowClient()
    client.set_tag(run_id, "anisora.guard", f"fired at round {verdict['round']}: {verdict['action']}"
                   + (f", back to round {verdict['best_round']}" if "best_round" in verdict else ""))
    if not fs.is_url(uri):
        client.log_artifact(run_id, uri)
    return uri
