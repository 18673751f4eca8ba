"""``anisora-ray report --run DIR``: one self-contained HTML page for an alignment job.

Everything is inside the file (plots as PNG data URIs, videos as mp4 data URIs, inline CSS, no
script or asset from the network), so it opens anywhere, offline, and can be mailed or logged to
MLflow as one artifact. Sections: the rounds table, the held-out curves per dimension, the
training curves of every round read from MLflow, and per held-out prompt its round-0 video next to
the last round's (same prompt, same seed).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import os
from collections.abc import Sequence

import pyarrow.parquet as pq

from anisora_ray.errors import ConfigError
from anisora_ray.eval.cache_audit import AUDIT_DIR, AUDIT_FILE
from anisora_ray.io import fs
from anisora_ray.loop.state import AlignState

TRAINING_METRICS = ("loss", "dpo", "gain", "implicit_accuracy")
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.pos{color:#176f2c}.neg{color:#a11}
.grid{display:flex;flex-wrap:wrap;gap:14px}.cell{border:1px solid #ddd;padding:6px;width:360px}
.cell video{width:170px}.muted{color:#777;font-size:12px}img{max-width:100%}"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _figures():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def rows_of(state: AlignState) -> list[dict]:
    return [state.baseline["row"], *(r.metrics for r in sorted(state.rounds, key=lambda r: r.index)
                                     if r.reached("evaluated"))]


def dimension_plot(rows: Sequence[dict]) -> str:
    plt = _figures()
    fig, ax = plt.subplots(figsize=(9, 3.6))
    rounds = [r["round"] for r in rows]
    dims = sorted(k.removeprefix("heldout_") for k in rows[0] if k.startswith("heldout_") and k not in
                  ("heldout_reward", "heldout_quarantined"))
    ax.plot(rounds, [r["heldout_reward"] for r in rows], "o-", color="black", lw=2.5, label="reward")
    for i, name in enumerate(dims):
        ax.plot(rounds, [r.get(f"heldout_{name}", math.nan) for r in rows], "o-", color=f"C{i}", label=name)
    ax.set(xlabel="round", ylabel="held-out normalized score", xticks=rounds)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def training_plot(histories: dict[int, dict[str, list[tuple[int, float]]]]) -> str | None:
    """``histories``: round → metric → [(step, value)]; one panel per metric, one line per round."""
    metrics = [m for m in TRAINING_METRICS if any(m in h for h in histories.values())]
    if not metrics:
        return None
    plt = _figures()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for index, history in sorted(histories.items()):
            points = sorted(history.get(metric, []))
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=f"round {index}")
        ax.set(title=metric, xlabel="update")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def training_histories(state: AlignState, tracking_uri: str | None) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """Each round's GAPO run's step metrics, from MLflow (empty when the store cannot be read)."""
    if not tracking_uri:
        return {}
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    out: dict[int, dict[str, list[tuple[int, float]]]] = {}
    for r in state.rounds:
        if not r.train_run_id:
            continue
        try:
            out[r.index] = {m: [(h.step, h.value) for h in client.get_metric_history(r.train_run_id, m)]
                            for m in TRAINING_METRICS}
        except Exception:  # noqa: BLE001 - a run from another store, or deleted: the report goes on without it
            continue
    return out


def _video(uri: str, embed: bool, base_dir: str) -> str:
    if embed:
        src = "data:video/mp4;base64," + base64.b64encode(fs.read_bytes(uri)).decode()
    else:
        src = html.escape(os.path.relpath(uri, base_dir) if not fs.is_url(uri) else uri)
    return f'<video src="{src}" autoplay loop muted playsinline></video>'


def side_by_side_cells(align_dir: str, last: int, embed: bool, base_dir: str, limit: int) -> list[str]:
    """Per held-out prompt: round 0 | round ``last`` (the first seed of each), with their rewards."""
    before = _scores(fs.join(align_dir, "round-0", "eval", "scores.parquet"))
    after = _scores(fs.join(align_dir, f"round-{last}", "eval", "scores.parquet"))
    cells = []
    for key in sorted(before)[:limit]:
        if key not in after:
            continue
        (b, a), (prompt_id, seed) = (before[key], after[key]), key
        delta = a["reward"] - b["reward"]
        cells.append(
            f'<div class="cell"><div><b>{html.escape(prompt_id)}</b> <span class="muted">seed {seed}</span></div>'
            f'<div class="muted">{html.escape(a["prompt"][:160])}</div>'
            f'{_video(b["video_uri"], embed, base_dir)} {_video(a["video_uri"], embed, base_dir)}'
            f'<div>round 0: {b["reward"]:.3f} &nbsp; round {last}: {a["reward"]:.3f} '
            f'<span class="{"pos" if delta > 0 else "neg"}">({delta:+.3f})</span></div></div>')
    return cells


def _scores(uri: str) -> dict[tuple[str, int], dict]:
    """The first candidate of each held-out prompt that was scored, by (prompt id, seed)."""
    if not fs.exists(uri):
        return {}
    return {(r["prompt_id"], int(r["seed"])): r for r in pq.read_table(fs.normalize(uri)).to_pylist()
            if r["candidate_index"] == 0 and not r.get("quarantine_reason") and math.isfinite(r["reward"])}


def _cell(value, fmt: str = "{:.4f}") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def rounds_table(rows: Sequence[dict]) -> str:
    head = ("round", "weights", "held-out reward", "gain vs round 0", "95% CI", "p", "prompts up", "pairs",
            "train loss", "implicit acc.")
    body = []
    for r in rows:
        gain = r.get("mean_diff")
        ci = f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]" if "ci_low" in r else ""
        up = f"{int(r['wins'])} / {int(r['num_prompts'])}" if "wins" in r else ""
        cls = "" if gain is None else ("pos" if r.get("ci_low", 0) > 0 else "neg" if r.get("ci_high", 0) < 0 else "")
        body.append("<tr>" + "".join([
            f"<td>{r['round']}</td>", f"<td>v{r.get('weights_version', '')}</td>",
            f"<td>{_cell(r.get('heldout_reward'))}</td>", f'<td class="{cls}">{_cell(gain, "{:+.4f}")}</td>',
            f"<td>{ci}</td>", f"<td>{_cell(r.get('p_value'), '{:.3g}')}</td>", f"<td>{up}</td>",
            f"<td>{_cell(r.get('pairs'), '{:.0f}')}</td>", f"<td>{_cell(r.get('train_loss'))}</td>",
            f"<td>{_cell(r.get('train_implicit_accuracy'), '{:.3f}')}</td>"]) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table>")


def guard_table(rows: Sequence[dict], verdict: dict) -> str:
    """Each round's guard measures (held-out, outside the training reward) and whether the guard fired."""
    measures = [k for k in rows[0] if k.startswith("guard_") and k != "guard_fired"]
    if not measures:
        return ""
    head = "".join(f"<th>{html.escape(m.removeprefix('guard_'))}</th>" for m in measures)
    body = "".join("<tr><td>" + str(r["round"]) + "</td>" + "".join(f"<td>{_cell(r.get(m))}</td>" for m in measures)
                   + f"<td class='{'neg' if r.get('guard_fired') else ''}'>{'fired' if r.get('guard_fired') else ''}</td></tr>"
                   for r in rows)
    note = (f"Fired at round {verdict['round']}: {verdict['action']}"
            + (f", replicas back to round {verdict['best_round']}." if "best_round" in verdict else ".")) if verdict else \
        "The guard passed every round."
    return (f"<h2>Reward-hacking guard</h2><p>{html.escape(note)}</p><table><tr><th>round</th>{head}<th></th></tr>"
            f"{body}</table><p class='muted'>Measures the training reward does not contain (eval/guard.py); the guard "
            "fires when the held-out reward rises over round 0 while one falls beyond loop.guard.margin (paired test).</p>")


def cache_audit_table(rows: Sequence[dict]) -> str:
    """The step cache's audits (eval/cache_audit.py): per audited round, how far the cache moved the frames, the
    reward and the pairs of the held-out prompts it rendered both ways; empty when no round was audited."""
    audited = [r for r in rows if "cache_audit_videos" in r]
    if not audited:
        return ""
    columns = (("cache_audit_videos", "videos", "{:.0f}"), ("cache_audit_drift_mean_levels", "drift, mean levels", "{:.2f}"),
               ("cache_audit_drift_max_levels", "max", "{:.0f}"), ("cache_audit_psnr_db", "PSNR dB", "{:.1f}"),
               ("cache_audit_reward_change", "reward change", "{:+.4f}"),
               ("cache_audit_reward_abs_change", "mean |change|", "{:.4f}"), ("cache_audit_same_pair", "same pair", "{:.0%}"),
               ("cache_audit_same_pair_pooled", "all audits so far", "{:.0%}"),
               ("cache_audit_signal_kept", "GAPO signal kept", "{:.0%}"),
               ("cache_audit_signal_kept_pooled", "all audits so far", "{:.0%}"))
    head = "".join(f"<th>{h}</th>" for _, h, _ in columns)
    body = "".join(f"<tr><td>{r['round']}</td>" + "".join(f"<td>{_cell(r.get(k), fmt)}</td>" for k, _, fmt in columns)
                   + "</tr>" for r in audited)
    exact = [r["round"] for r in rows if r.get("rollouts_exact")]
    verdict = (f"<p class='neg'>The audits showed the cache moving the pairs: rollouts computed every step from round "
               f"{min(exact)} on (generator.cache.on_moved_pairs: exact).</p>" if exact else "")
    return (f"<h2>Step cache audit</h2><table><tr><th>round</th>{head}</tr>{body}</table>{verdict}<p class='muted'>The "
            "first generator.cache.audit_prompts held-out prompts, a rollout's candidates each, rendered with the cache "
            "and with every step computed: drift of the raw frames (PSNR: empty when equal), the reward with the cache "
            "minus without, the share of prompts whose best and worst candidate stay the same, and the share of the exact "
            "pairs' GAPO weight (alpha**r_w - alpha**r_l, exact rewards) the cache's pairs keep: a swapped near-tie "
            "loses little, an inverted pair counts against. Each in this audit and pooled over every audit so far: "
            "generator.cache.min_same_pair and min_signal_kept act on the pooled ones.</p>")


def cache_audit_cells(align_dir: str, rows: Sequence[dict], embed: bool, base_dir: str, limit: int) -> list[str]:
    """The last audited round's videos: per audited video, with the cache | every step computed, and both rewards
    (none once ``run.keep`` pruned them)."""
    audited = [r["round"] for r in rows if "cache_audit_videos" in r]
    uri = fs.join(align_dir, f"round-{audited[-1]}", "eval", AUDIT_DIR, AUDIT_FILE) if audited else None
    if uri is None or not fs.exists(uri):
        return []
    cells = []
    for r in fs.read_table(uri).to_pylist()[:limit]:
        if not (fs.exists(r["video_cached"]) and fs.exists(r["video_exact"])):
            continue
        psnr = "equal frames" if math.isinf(r["psnr_db"]) else f"PSNR {r['psnr_db']:.1f} dB"
        cells.append(
            f'<div class="cell"><div><b>{html.escape(r["prompt_id"])}</b> <span class="muted">seed {r["seed"]} · '
            f'{psnr}, max {r["drift_max_levels"]:.0f} levels</span></div>'
            f'{_video(r["video_cached"], embed, base_dir)} {_video(r["video_exact"], embed, base_dir)}'
            f'<div>cached: {_cell(r["reward_cached"], "{:.3f}")} &nbsp; exact: {_cell(r["reward_exact"], "{:.3f}")}'
            f'</div></div>')
    return [f"<h3>Round {audited[-1]}: with the cache | every step computed</h3><div class='grid'>{''.join(cells)}</div>"
            ] if cells else []


def human_section(db_path: str) -> str:
    """The blind side-by-side study in ``db_path``: 2-of-3 win rate with its Wilson CI, Fleiss' kappa, annotators."""
    from anisora_ray.eval.annotate import AnnotationStore, summarize

    if not os.path.isfile(db_path):
        return ""
    s = summarize(AnnotationStore(db_path))
    if not s["judged"]:
        return (f"<h2>Human evaluation</h2><p class='muted'>{s['comparisons']} comparisons in {html.escape(db_path)}, "
                "none judged by three annotators yet.</p>")
    low, high = s["win_rate_ci"]
    people = "".join(f"<tr><td class='l'>{html.escape(name)}</td><td>{c.get('answers', 0)}</td><td>{c.get('trained', 0)}"
                     f"</td><td>{c.get('baseline', 0)}</td><td>{c.get('tie', 0)}</td></tr>"
                     for name, c in s["annotators"].items())
    return (f"<h2>Human evaluation ({html.escape(str(s['trained']))} vs {html.escape(str(s['baseline'] or 'baseline'))}, "
            "blind, sides randomized)</h2>"
            f"<p>Win rate {s['win_rate']:.3f}, 95% CI [{low:.3f}, {high:.3f}] (Wilson): {s['wins']} won, {s['losses']} "
            f"lost, {s['undecided']} without a 2-of-3 majority, of {s['judged']} comparisons judged "
            f"({s['comparisons']} in the study). Fleiss' kappa {s['fleiss_kappa']:.3f}.</p>"
            "<table><tr><th class='l'>annotator</th><th>answers</th><th>preferred trained</th>"
            f"<th>preferred baseline</th><th>tie</th></tr>{people}</table>")


def comparison_section(comparison_json: str) -> str:
    """An ``anisora-ray eval`` / ``ablate`` comparison (per-metric gains, win rates) as a table."""
    import json

    if not fs.exists(comparison_json):
        return ""
    c = json.loads(fs.read_bytes(comparison_json))
    base = c["baseline"]
    labels = [label for label in c["means"] if label != base]
    head = "".join(f"<th>{html.escape(x)}</th>" for x in ["metric", base, *(f"{v} (gain, p)" for v in labels)])
    body = []
    for m in c["metrics"]:
        cells = [f"<td class='l'>{html.escape(m)}</td><td>{_cell(c['means'][base][m])}</td>"]
        for label in labels:
            d = c["versions"][label]["metrics"][m]
            cls = "pos" if (d["ci_low"] or 0) > 0 else "neg" if (d["ci_high"] or 0) < 0 else ""
            cells.append(f"<td class='{cls}'>{_cell(c['means'][label][m])} ({_cell(d['mean_diff'], '{:+.4f}')}, "
                         f"p {_cell(d['p_value'], '{:.3g}')})</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    wins = "".join(f"<tr><td class='l'>{html.escape(v)}</td><td>{_cell(w['win_rate'], '{:.3f}')}</td>"
                   f"<td>[{_cell(w['ci_low'], '{:.3f}')}, {_cell(w['ci_high'], '{:.3f}')}]</td><td>{w['n']}</td></tr>"
                   for v in labels for w in [c["versions"][v]["reward_win_rate"]])
    forms = "; ".join(f"{k}: {v}" for k, v in c.get("forms", {}).items())
    return (f"<h2>Evaluation: versions against {html.escape(base)}</h2><table><tr>{head}</tr>{''.join(body)}</table>"
            f"<p class='muted'>{html.escape(forms)}</p><table><tr><th class='l'>version</th><th>win rate by the reward"
            f"</th><th>95% CI</th><th>candidates</th></tr>{wins}</table>")


def build_report(align_dir: str, out_html: str | None = None, tracking_uri: str | None = None,
                 embed_videos: bool | None = None, max_prompts: int = 32, title: str | None = None,
                 eval_dir: str | None = None) -> str:
    """Write the report of the job in ``align_dir`` (the folder holding ``state.json``); returns its path.
    ``embed_videos`` None: embed when the videos total under 64 MB, else link them (relative paths).
    A human study (``annotations.sqlite``) and an ``anisora-ray eval`` comparison (``comparison.json``) are
    shown from ``eval_dir`` (default: ``<run.output_dir>/eval``) and ``align_dir``, where present."""
    state_uri = fs.join(align_dir, "state.json")
    if not fs.exists(state_uri):
        raise ConfigError(f"{state_uri} does not exist: --run takes an alignment job's align/ folder "
                                "(<run.output_dir>/align)")
    state = AlignState.load(state_uri)
    if not state.baseline:
        raise ConfigError(f"{state_uri}: the job has not evaluated round 0 yet; nothing to report")
    rows = rows_of(state)
    out_html = out_html or fs.join(align_dir, "report.html")
    base_dir = os.path.dirname(os.path.abspath(out_html)) if not fs.is_url(out_html) else ""
    last = rows[-1]["round"]
    if embed_videos is None:
        sizes = [os.path.getsize(os.path.join(d, n)) for r in (0, last)
                 for d, _, names in os.walk(os.path.join(align_dir, f"round-{r}", "eval", "videos")) for n in names]
        embed_videos = sum(sizes) < 64 * 2**20
    cells = side_by_side_cells(align_dir, last, embed_videos, base_dir, max_prompts) if last > 0 else []
    training = training_plot(training_histories(state, tracking_uri))
    final = rows[-1]
    summary = (f"Held-out reward {rows[0]['heldout_reward']:.4f} → {final['heldout_reward']:.4f} after {last} "
               f"round(s)" + (f": gain {final['mean_diff']:+.4f}, 95% CI [{final['ci_low']:+.4f}, "
                              f"{final['ci_high']:+.4f}], p = {final['p_value']:.3g}, {int(final['wins'])} of "
                              f"{int(final['num_prompts'])} prompts up." if "mean_diff" in final else "."))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title or 'anisora-ray alignment report')}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title or 'Alignment report')}</h1>",
        f"<p class='muted'>{html.escape(os.path.abspath(align_dir) if not fs.is_url(align_dir) else align_dir)} · "
        f"generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}</p>",
        f"<p>{html.escape(summary)}</p>", "<h2>Rounds</h2>", rounds_table(rows),
        "<p class='muted'>Gain: mean over held-out prompts of (reward − round 0 reward), same prompts and seeds; "
        "CI: BCa bootstrap over prompts; p: two-sided paired sign-flip permutation test.</p>",
        "<h2>Held-out score per dimension</h2>", f"<img src='{dimension_plot(rows)}' alt='per-dimension curves'>",
        guard_table(rows, state.guard),
        cache_audit_table(rows),
        *cache_audit_cells(align_dir, rows, embed_videos, base_dir, max_prompts),
        pruned_section(state),
        "<h2>Training</h2>",
        f"<img src='{training}' alt='training curves'>" if training else "<p class='muted'>no training runs found "
        "in MLflow (pass the tracking store)</p>",
        f"<h2>Round 0 | round {last}, per held-out prompt</h2>" if cells else "",
        "<div class='grid'>" + "".join(cells) + "</div>" if cells else "",
        *extra_sections(align_dir, eval_dir),
        "</body></html>"]
    fs.write_bytes(out_html, "\n".join(parts).encode())
    return out_html


def pruned_section(state: AlignState) -> str:
    """What ``run.keep`` deleted, per round (loop/retention.py); empty when nothing was."""
    rows = [(rs.index, what, r) for rs in sorted(state.rounds, key=lambda r: r.index) for what, r in sorted(rs.pruned.items())]
    if not rows:
        return ""
    body = "".join(f"<tr><td>{i}</td><td>{html.escape(what.replace('_', ' '))}</td><td>{r['bytes'] / 1e6:.1f}</td>"
                   f"<td>{html.escape(r['setting'])}</td><td>{html.escape(r['at'])}</td></tr>" for i, what, r in rows)
    return ("<h2>Pruned by run.keep</h2><table><tr><th>round</th><th>files</th><th>MB freed</th><th>setting</th>"
            f"<th>when (UTC)</th></tr>{body}</table><p class='muted'>Their tables (pairs, scores, metrics) are kept.</p>")


def extra_sections(align_dir: str, eval_dir: str | None) -> list[str]:
    if fs.is_url(align_dir):
        return []
    folders = [align_dir, eval_dir or os.path.join(os.path.dirname(os.path.abspath(align_dir.rstrip("/"))), "eval")]
    found = []
    for folder in dict.fromkeys(folders):
        found += [comparison_section(os.path.join(folder, "comparison.json")),
                  human_section(os.path.join(folder, "annotations.sqlite"))]
    return [x for x in found if x]


def log_report(align_dir: str, html_path: str, tracking_uri: str | None) -> str:
    """Log the page to the job's parent MLflow run (from ``state.json``); returns the run id."""
    import mlflow

    state = AlignState.load(fs.join(align_dir, "state.json"))
    client = mlflow.MlflowClient(tracking_uri) if tracking_uri else mlflow.MlflowClient()
    client.log_artifact(state.parent_run_id, html_path)
    return state.parent_run_id
