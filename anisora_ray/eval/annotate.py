"""Blind human side-by-side evaluation: a SQLite store of comparisons and answers, and their summary.

A comparison shows two videos of the same held-out prompt, first frame and seed, from two weights
versions (the baseline, round 0, and a trained round). Which side shows which version is drawn at
random per comparison, stored, and never sent to the page. Each annotator answers left / right /
tie once per comparison; answering again replaces the earlier answer (one row per annotator and
comparison). As in the paper, a comparison is won by the version that at least two of three
annotators prefer; the summary gives that win rate with a Wilson CI, Fleiss' kappa, and
per-annotator counts. The web page is :mod:`anisora_ray.eval.annotate_server`.
"""

from __future__ import annotations

import math
import random
import re
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from anisora_ray.errors import ConfigError

CHOICES = ("left", "right", "tie")
SCHEMA = """
CREATE TABLE IF NOT EXISTS comparisons (
    id INTEGER PRIMARY KEY, prompt_id TEXT NOT NULL, prompt TEXT NOT NULL, seed INTEGER NOT NULL,
    left_label TEXT NOT NULL, right_label TEXT NOT NULL, left_uri TEXT NOT NULL, right_uri TEXT NOT NULL,
    UNIQUE (prompt_id, seed, left_label, right_label));
CREATE TABLE IF NOT EXISTS answers (
    annotator TEXT NOT NULL, comparison_id INTEGER NOT NULL REFERENCES comparisons(id),
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')), answered_at REAL NOT NULL,
    PRIMARY KEY (annotator, comparison_id));
CREATE TABLE IF NOT EXISTS studies (
    baseline TEXT NOT NULL, trained TEXT NOT NULL, added_at REAL NOT NULL, PRIMARY KEY (baseline, trained));
"""


@dataclass(frozen=True)
class Candidate:
    """One video of a version: what a comparison side points at."""

    prompt_id: str
    prompt: str
    seed: int
    video_uri: str


class AnnotationStore:
    """The comparisons and answers of one study, in a SQLite file (each write is one transaction)."""

    def __init__(self, path: str):
        self.path = path
        with self._db() as db:
            db.executescript(SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # autocommit; explicit transactions below
        db.execute("PRAGMA journal_mode=WAL")
        db.row_factory = sqlite3.Row
        return db

    def add_comparisons(self, baseline: str, trained: str, pairs: Iterable[tuple[Candidate, Candidate]],
                        seed: int = 0) -> int:
        """One comparison per (baseline, trained) candidate pair of the same prompt and seed; sides drawn at
        random (recorded), and which version is the baseline (:meth:`studies`). Already stored pairs are kept as
        they are; returns how many were added."""
        rng = random.Random(seed)
        added = 0
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO studies (baseline, trained, added_at) VALUES (?, ?, ?) ON CONFLICT (baseline, "
                       "trained) DO UPDATE SET added_at=excluded.added_at", (baseline, trained, time.time()))
            for base, new in pairs:
                if (base.prompt_id, base.seed) != (new.prompt_id, new.seed):
                    raise ValueError(f"a comparison needs the same prompt and seed: {base.prompt_id}/{base.seed} vs "
                                     f"{new.prompt_id}/{new.seed}")
                sides = [(baseline, base.video_uri), (trained, new.video_uri)]
                rng.shuffle(sides)
                exists = db.execute("SELECT 1 FROM comparisons WHERE prompt_id=? AND seed=? AND "
                                    "((left_label=? AND right_label=?) OR (left_label=? AND right_label=?))",
                                    (base.prompt_id, base.seed, baseline, trained, trained, baseline)).fetchone()
                if exists:
                    continue
                db.execute("INSERT INTO comparisons (prompt_id, prompt, seed, left_label, right_label, left_uri, "
                           "right_uri) VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (base.prompt_id, base.prompt, base.seed, sides[0][0], sides[1][0], sides[0][1], sides[1][1]))
                added += 1
            db.execute("COMMIT")
        return added

    def studies(self) -> list[tuple[str, str]]:
        """(baseline, trained) of every study served from this file, the most recently served first (none in a
        file written before studies were recorded)."""
        with self._db() as db:
            return [(r["baseline"], r["trained"]) for r in db.execute("SELECT * FROM studies ORDER BY added_at DESC")]

    def comparisons(self) -> list[dict]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM comparisons ORDER BY id")]

    def comparison(self, comparison_id: int) -> dict | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM comparisons WHERE id=?", (comparison_id,)).fetchone()
        return dict(row) if row else None

    def answer(self, annotator: str, comparison_id: int, choice: str) -> None:
        """Store (or replace) one answer, atomically."""
        annotator = clean_name(annotator)
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        if self.comparison(comparison_id) is None:
            raise KeyError(f"no comparison {comparison_id}")
        with self._db() as db:
            db.execute("INSERT INTO answers (annotator, comparison_id, choice, answered_at) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (annotator, comparison_id) DO UPDATE SET choice=excluded.choice, "
                       "answered_at=excluded.answered_at", (annotator, comparison_id, choice, time.time()))

    def answers(self) -> list[dict]:
        with self._db() as db:
            return [dict(r) for r in db.execute("SELECT * FROM answers ORDER BY comparison_id, annotator")]

    def next_for(self, annotator: str) -> tuple[dict | None, int, int]:
        """The annotator's next unanswered comparison (in an order of their own), done count, total."""
        annotator = clean_name(annotator)
        with self._db() as db:
            done = {r[0] for r in db.execute("SELECT comparison_id FROM answers WHERE annotator=?", (annotator,))}
            ids = [r[0] for r in db.execute("SELECT id FROM comparisons ORDER BY id")]
        random.Random(annotator).shuffle(ids)  # each annotator their own order, stable across reloads
        todo = [i for i in ids if i not in done]
        return (self.comparison(todo[0]) if todo else None), len(ids) - len(todo), len(ids)


def clean_name(name: str) -> str:
    name = (name or "").strip()
    if not name or len(name) > 64 or any(c in name for c in "\n\r\t"):
        raise ValueError("an annotator name is 1-64 characters on one line")
    return name


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def fleiss_kappa(counts: list[list[int]]) -> float:
    """Fleiss' kappa of N items × k categories of rating counts (every item rated by the same number n ≥ 2)."""
    if not counts:
        return math.nan
    n = sum(counts[0])
    if n < 2 or any(sum(row) != n for row in counts):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings for every item")
    items = len(counts)
    p_j = [sum(row[j] for row in counts) / (items * n) for j in range(len(counts[0]))]
    p_i = [(sum(c * c for c in row) - n) / (n * (n - 1)) for row in counts]
    p_bar, p_e = sum(p_i) / items, sum(p * p for p in p_j)
    return 1.0 if p_e == 1.0 else (p_bar - p_e) / (1.0 - p_e)


def summarize(store: AnnotationStore, trained: str | None = None, judges: int = 3, baseline: str | None = None) -> dict:
    """Over the comparisons of ``trained`` against ``baseline``: majority verdicts (more than half of a
    comparison's votes, at least ``judges`` of them), the trained version's win rate with a Wilson CI, Fleiss' kappa
    over the comparisons answered by exactly ``judges`` annotators, counts per annotator. Either left out is the most
    recently served study's that agrees with the other (for a file without studies: the newest version, rounds by
    number, then the other labels, against any)."""
    every = store.comparisons()
    labels = version_order({c["left_label"] for c in every} | {c["right_label"] for c in every})
    served = [(b, t) for b, t in store.studies() if baseline in (None, b) and trained in (None, t)]
    if served:
        baseline, trained = served[0]
    trained = trained or next((x for x in reversed(labels) if x != baseline), None)
    comparisons = {c["id"]: c for c in every if trained in (c["left_label"], c["right_label"])
                   and (baseline is None or baseline in (c["left_label"], c["right_label"]))}
    votes: dict[int, list[str]] = defaultdict(list)  # comparison -> the label each annotator preferred ("tie")
    per_annotator: dict[str, Counter] = defaultdict(Counter)
    for a in store.answers():
        c = comparisons.get(a["comparison_id"])
        if c is None:  # another pair of versions in the same study
            continue
        label = c[f"{a['choice']}_label"] if a["choice"] != "tie" else "tie"
        votes[a["comparison_id"]].append(label)
        per_annotator[a["annotator"]]["answers"] += 1
        per_annotator[a["annotator"]]["tie" if label == "tie" else ("trained" if label == trained else "baseline")] += 1
    judged = {cid: v for cid, v in votes.items() if len(v) >= judges}
    wins = sum(1 for v in judged.values() if v.count(trained) > len(v) / 2)  # 2 of 3, 3 of 4 or 5
    losses = sum(1 for v in judged.values() if sum(1 for x in v if x not in (trained, "tie")) > len(v) / 2)
    decided = wins + losses
    exact = [v for v in votes.values() if len(v) == judges]
    categories = [trained, "tie", *[x for x in labels if x != trained]]
    kappa = fleiss_kappa([[v.count(c) for c in categories] for v in exact]) if exact and judges >= 2 else math.nan
    low, high = wilson(wins, len(judged))
    return {"trained": trained, "baseline": baseline, "comparisons": len(comparisons), "judged": len(judged), "wins": wins,
            "losses": losses, "undecided": len(judged) - decided,
            "win_rate": wins / len(judged) if judged else math.nan, "win_rate_ci": [low, high],
            "fleiss_kappa": kappa, "annotators": {k: dict(v) for k, v in sorted(per_annotator.items())}}


def version_order(labels: Iterable[str]) -> list[str]:
    """Version labels oldest first: rounds by number (``round-10`` after ``round-3``), then the other labels."""
    rounds = sorted((x for x in labels if re.fullmatch(r"round-\d+", x)), key=lambda x: int(x.split("-")[1]))
    return rounds + sorted(x for x in labels if x not in rounds)


def label_of(version: int | str) -> str:
    """A round number names ``round-<r>``; any other label (``anisora-ray eval`` versions) stays as it is."""
    return f"round-{version}" if isinstance(version, int) or str(version).isdigit() else str(version)


def eval_labels(eval_dir: str) -> list[str]:
    """The versions with held-out videos under ``eval_dir`` (``<label>/eval/candidates.parquet``): the rounds
    of an align job, or the versions of ``anisora-ray eval``; rounds in order, then the other labels."""
    import os

    from anisora_ray.io import fs

    filesystem, root = fs.url_to_fs(eval_dir)
    found = [os.path.basename(e.rstrip("/")) for e in filesystem.ls(root, detail=False)
             if filesystem.exists(f"{e.rstrip('/')}/eval/candidates.parquet")]
    return version_order(found)


def eval_candidates(eval_dir: str, version: int | str) -> dict[tuple[str, int], Candidate]:
    """The held-out videos of a version (a round number or a label), by (prompt id, seed)."""
    import pyarrow.parquet as pq

    from anisora_ray.io import fs

    uri = fs.join(eval_dir, label_of(version), "eval", "candidates.parquet")
    if not fs.exists(uri):
        raise ConfigError(f"{uri} does not exist: {label_of(version)} has no held-out evaluation")
    rows = pq.read_table(fs.normalize(uri)).to_pylist()
    return {(r["prompt_id"], int(r["seed"])): Candidate(r["prompt_id"], r["prompt"], int(r["seed"]), r["video_uri"])
            for r in rows}


def build_study(eval_dir: str, db_path: str | None = None, baseline: int | str = 0, trained: int | str | None = None,
                seed: int = 0) -> AnnotationStore:
    """A study comparing version ``trained`` (default: the last round, or the last label) with ``baseline`` on
    every held-out prompt and seed both generated; stored in ``db_path`` (default ``<eval_dir>/annotations.sqlite``)."""
    from anisora_ray.io import fs

    labels = eval_labels(eval_dir)
    base = label_of(baseline)
    new = label_of(trained) if trained is not None else next((x for x in reversed(labels) if x != base), None)
    if new is None or new == base:
        raise ConfigError(f"{eval_dir}: needs two evaluated versions to compare (found {labels})")
    before, after = eval_candidates(eval_dir, base), eval_candidates(eval_dir, new)
    common = sorted(set(before) & set(after))
    gone = [c.video_uri for k in common for c in (before[k], after[k]) if not fs.exists(c.video_uri)]
    if gone:  # pruned by run.keep.eval_videos, or moved: an annotator would judge a blank side
        raise ConfigError(f"{len(gone)} held-out video(s) of {base} or {new} are not there (e.g. {gone[0]}): a study "
                          "needs both sides' videos; evaluate the version again (anisora-ray eval --regenerate) or "
                          "keep them with run.keep.eval_videos")
    if not common:
        raise ConfigError(f"{base} and {new} share no held-out prompt and seed")
    store = AnnotationStore(db_path or fs.join(eval_dir, "annotations.sqlite"))
    store.add_comparisons(base, new, [(before[k], after[k]) for k in common], seed)
    return store
