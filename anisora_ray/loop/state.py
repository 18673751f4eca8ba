"""The alignment job's state, persisted after every phase so ``--resume`` redoes no finished work."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass

from anisora_ray.io import fs

PHASES = ("started", "paired", "trained", "refreshed", "evaluated")  # a round is done when evaluated


def snapshot(value):
    """``value`` as plain data, each dict and list copied in one step first (atomic under the GIL): in the
    overlapped schedule one thread may add a round's metric while the other saves the state, which made
    ``dataclasses.asdict`` raise "dictionary changed size during iteration"."""
    if is_dataclass(value):
        return {f.name: snapshot(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.copy().items()}
    if isinstance(value, list | tuple):
        return [snapshot(v) for v in list(value)]
    return value


@dataclass
class RoundState:
    index: int
    phase: str = "started"
    pairs_uri: str = ""
    weights_uri: str = ""
    checkpoint_uri: str = ""
    weights_version: int = 0
    mlflow_run_id: str = ""
    train_run_id: str = ""  # the round's GAPO MLflow run, recorded before training starts (resume continues it)
    metrics: dict[str, float] = field(default_factory=dict)
    pruned: dict[str, dict] = field(default_factory=dict)  # category -> what run.keep deleted (loop/retention.py)

    def reached(self, phase: str) -> bool:
        return PHASES.index(self.phase) >= PHASES.index(phase)


@dataclass
class AlignState:
    parent_run_id: str = ""
    baseline: dict = field(default_factory=dict)  # held-out result of the untrained generator (round 0)
    statistics_uri: str = ""  # zscore statistics frozen at round 0 (every round's pairing and evaluation use them)
    rounds: list[RoundState] = field(default_factory=list)
    guard: dict = field(default_factory=dict)  # the reward-hacking guard's verdict when it stopped the loop
    cache_audits: dict = field(default_factory=dict)  # round -> [prompts that kept their pair, prompts audited, GAPO
    # signal of the cache's pairs, of the exact pairs] (loop/cache_policy.py)
    cache_verdict: dict = field(default_factory=dict)  # the step cache moved the pairs (loop/cache_policy.py)

    def round(self, index: int) -> RoundState:
        for r in self.rounds:
            if r.index == index:
                return r
        self.rounds.append(RoundState(index))
        return self.rounds[-1]

    def latest_weights(self) -> RoundState | None:
        """The last round whose weights reached the replicas (what a resumed job must load); after a guard
        rollback, the round rolled back to (None: the untrained generator)."""
        if "best_round" in self.guard:
            return next((r for r in self.rounds if r.index == self.guard["best_round"]), None)
        done = [r for r in self.rounds if r.reached("refreshed")]
        return max(done, key=lambda r: r.index) if done else None

    def save(self, uri: str) -> None:
        fs.write_bytes(uri, json.dumps(snapshot(self), indent=2, sort_keys=True).encode())

    @classmethod
    def load(cls, uri: str) -> AlignState:
        raw = json.loads(fs.read_bytes(uri))
        return cls(parent_run_id=raw["parent_run_id"], baseline=raw["baseline"], statistics_uri=raw.get("statistics_uri", ""),
                   rounds=[RoundState(**{"train_run_id": "", **r}) for r in raw["rounds"]], guard=raw.get("guard", {}),
                   cache_audits=raw.get("cache_audits", {}), cache_verdict=raw.get("cache_verdict", {}))
