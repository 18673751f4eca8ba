"""Version against baseline on the same held-out prompts and seeds: per-metric paired statistics and win rates.

The rows of a version are its held-out candidates (one per prompt and seed) with AnimeReward
(``reward`` and one column per dimension) and the VBench-style metrics. A metric's comparison is
paired over prompts (the mean over a prompt's seeds, as in ``align``); the reward win rate pairs
candidates of the same prompt and seed: the share whose reward rose, with a Wilson CI.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

from anisora_ray.eval.annotate import wilson
from anisora_ray.eval.stats import compare_or_nan


def scored(rows: Iterable[Mapping], metric: str) -> dict[tuple[str, int], float]:
    """``metric`` of each candidate (prompt, seed) with a finite value, not quarantined."""
    out = {}
    for r in rows:
        v = r.get(metric)
        if v is not None and math.isfinite(float(v)) and not r.get("quarantine_reason"):
            out[(r["prompt_id"], int(r["seed"]))] = float(v)
    return out


def _by_prompt(values: Mapping[tuple[str, int], float], keys: set | None = None) -> dict[str, float]:
    """Each prompt's mean of ``values`` ((prompt, seed) -> value; only the ``keys`` when given: the candidates every
    compared version scored, so a prompt's means are over the same seeds)."""
    grouped: dict[str, list[float]] = defaultdict(list)
    for (prompt, seed), v in values.items():
        if keys is None or (prompt, seed) in keys:
            grouped[prompt].append(v)
    return {k: sum(v) / len(v) for k, v in grouped.items() if v}


def prompt_mean(values: Mapping[str, float] | float) -> float:
    """A prompt's mean over its seeds (seed -> value); a bare number is a record from before per-seed values."""
    if not isinstance(values, Mapping):
        return float(values)
    return sum(values.values()) / len(values) if values else math.nan


def paired_means(before: Mapping[str, Mapping[str, float] | float],
                 after: Mapping[str, Mapping[str, float] | float]) -> tuple[dict[str, float], dict[str, float]]:
    """Two sides' per-prompt means (prompt -> seed -> value) over the seeds both have a finite value of: a candidate
    one side lacks (quarantined, unreadable) made a prompt compare other seeds, a change with no video changing. A
    bare number (a record from before per-seed values) is compared with the other side's mean over all its seeds."""
    out_before, out_after = {}, {}
    for prompt, b in before.items():
        a = after.get(prompt)
        if a is None:
            continue
        if isinstance(b, Mapping) and isinstance(a, Mapping):
            seeds = {s for s in b if s in a and math.isfinite(b[s]) and math.isfinite(a[s])}
            b, a = {s: b[s] for s in seeds}, {s: a[s] for s in seeds}
            if not seeds:
                continue
        out_before[prompt], out_after[prompt] = prompt_mean(b), prompt_mean(a)
    return out_before, out_after


def reward_win_rate(before: Iterable[Mapping], after: Iterable[Mapping], metric: str = "reward") -> dict:
    """Candidates of the same prompt and seed: how often ``after`` scored higher (ties count as not won)."""
    base = {(r["prompt_id"], int(r["seed"])): float(r[metric]) for r in before
            if r.get(metric) is not None and math.isfinite(float(r[metric])) and not r.get("quarantine_reason")}
    wins = losses = ties = 0
    for r in after:
        key = (r["prompt_id"], int(r["seed"]))
        value = r.get(metric)
        if key not in base or value is None or not math.isfinite(float(value)) or r.get("quarantine_reason"):
            continue
        wins, losses, ties = wins + (value > base[key]), losses + (value < base[key]), ties + (value == base[key])
    n = wins + losses + ties
    low, high = wilson(wins, n)
    return {"wins": wins, "losses": losses, "ties": ties, "n": n, "win_rate": wins / n if n else math.nan,
            "ci_low": low, "ci_high": high}


def compare_versions(tables: Mapping[str, list[Mapping]], baseline: str, metrics: list[str], samples: int = 2000,
                     seed: int = 0) -> dict:
    """Every version of ``tables`` against ``baseline``, per metric over the candidates (prompt, seed) every version
    scored (``mean_prompts``: their prompts; a candidate one version lost would otherwise move only its mean, or pair
    a prompt's mean over other seeds): each version's mean over prompts, and the paired difference with its BCa CI
    and permutation p-value, so the means' difference is the paired gain; and the reward win rate."""
    if baseline not in tables:
        raise KeyError(f"baseline {baseline!r} is not among the versions {sorted(tables)}")
    base_rows = tables[baseline]
    out: dict = {"baseline": baseline, "metrics": list(metrics), "means": {}, "mean_prompts": {}, "versions": {}}
    values = {label: {m: scored(rows, m) for m in metrics} for label, rows in tables.items()}
    common = {m: set.intersection(*(set(v[m]) for v in values.values())) for m in metrics}
    prompt_means = {label: {m: _by_prompt(values[label][m], common[m]) for m in metrics} for label in tables}
    out["mean_prompts"] = {m: len({p for p, _ in common[m]}) for m in metrics}
    for label, rows in tables.items():
        out["means"][label] = {m: _mean(prompt_means[label][m]) for m in metrics}
        if label == baseline:
            continue
        per_metric = {m: compare_or_nan(prompt_means[baseline][m], prompt_means[label][m], samples=samples,
                                        seed=seed).to_dict() for m in metrics}
        out["versions"][label] = {"metrics": per_metric, "reward_win_rate": reward_win_rate(base_rows, rows)}
    return out


def _mean(values: Mapping[str, float]) -> float:
    return sum(values.values()) / len(values) if values else math.nan


def _fmt(x: float, signed: bool = False) -> str:
    return "n/a" if x is None or not math.isfinite(x) else (f"{x:+.4f}" if signed else f"{x:.4f}")


def _fmt_p(p: float) -> str:
    return "n/a" if p is None or not math.isfinite(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def markdown_table(comparison: Mapping, human: Mapping[str, Mapping] | None = None) -> str:
    """The comparison as Markdown: one row per metric, per version its mean and its gain [95% CI] (p);
    then the win rates over the baseline, by the reward and (where a study was answered) by humans."""
    base = comparison["baseline"]
    labels = [label for label in comparison["means"] if label != base]
    head = f"| metric | {base} | " + " | ".join(f"{label} | gain vs {base} [95% CI], p" for label in labels) + " |"
    lines = [head, "| --- " * (2 + 2 * len(labels)) + "|"]
    counts = comparison.get("mean_prompts", {})
    for m in comparison["metrics"]:
        cells = [f"{m} (n={counts[m]})" if m in counts else m, _fmt(comparison["means"][base][m])]
        for label in labels:
            c = comparison["versions"][label]["metrics"][m]
            cells += [_fmt(comparison["means"][label][m]),
                      f"{_fmt(c['mean_diff'], True)} [{_fmt(c['ci_low'], True)}, {_fmt(c['ci_high'], True)}], "
                      f"p {_fmt_p(c['p_value'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"| version | win rate over {base} by the reward [95% CI] | by humans (2 of 3) [95% CI] |",
              "| --- | --- | --- |"]
    for label in labels:
        w = comparison["versions"][label]["reward_win_rate"]
        h = (human or {}).get(label)
        by_humans = (f"{h['win_rate']:.3f} [{h['win_rate_ci'][0]:.3f}, {h['win_rate_ci'][1]:.3f}] "
                     f"({h['wins']} of {h['judged']}; kappa {h['fleiss_kappa']:.2f})" if h and h.get("judged") else "no study")
        lines.append(f"| {label} | {_fmt(w['win_rate'])} [{_fmt(w['ci_low'])}, {_fmt(w['ci_high'])}] "
                     f"({w['wins']} of {w['n']}) | {by_humans} |")
    return "\n".join(lines) + "\n"


VBENCH_COLUMNS = ("subject_consistency", "dynamic_degree", "motion_smoothness", "aesthetic_quality")


def paper_table(comparison: Mapping) -> str:
    """The paper's layout (its Tables 3-4): a row per version, the baseline first; columns grouped as VBench-I2V,
    VideoScore and AnimeReward, each cell the mean over prompts, marked ↑ / ↓ where the paired gain over the
    baseline is significant (p < 0.05). Metrics the comparison lacks are left out."""
    from anisora_ray.types import DIMENSIONS

    metrics = comparison["metrics"]
    groups = [("VBench-I2V", [m for m in VBENCH_COLUMNS if m in metrics]),
              ("VideoScore", [m for m in metrics if m.startswith("videoscore_")]),
              ("AnimeReward", [m for m in (*DIMENSIONS, "reward") if m in metrics])]
    columns = [(g, m) for g, ms in groups for m in ms]
    short = {m: m.removeprefix("videoscore_") for _, m in columns}
    lines = ["| version | " + " | ".join(f"{g}: {short[m]}" for g, m in columns) + " |",
             "| --- " * (1 + len(columns)) + "|"]
    base = comparison["baseline"]
    for label, means in comparison["means"].items():
        cells = []
        for _, m in columns:
            mark = ""
            if label != base:
                c = comparison["versions"][label]["metrics"][m]
                if math.isfinite(c["p_value"]) and c["p_value"] < 0.05:
                    mark = " ↑" if c["mean_diff"] > 0 else " ↓"
            cells.append(_fmt(means[m]) + mark)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n↑ / ↓: paired gain over {base} significant at p < 0.05 (per-metric details below).\n"
