"""Exactly-once output of a pairs run: numbered parquet shards, and resume from what is there.

Every ``flush`` writes, in this order, optionally ``scores-NNNNN.parquet`` (every candidate),
``quarantine-NNNNN.parquet`` (each candidate set aside, with the reason, whether or not its prompt paired),
``skipped-NNNNN.parquet`` (prompts with no pair, with the reason) and last ``pairs-NNNNN.parquet``; each file
is written atomically. A prompt counts as done once it is in a pairs or skipped shard, so a re-run skips it and
no prompt is written twice; an interruption loses at most the unflushed prompts, which are redone. Scores and
quarantined candidates of prompts an interrupted flush left undone (written before their prompt's shard) are
dropped when the writer opens, so the redone prompts' rows are not there twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import pyarrow as pa

from anisora_ray.errors import ConfigError
from anisora_ray.io import fs
from anisora_ray.types import PreferencePair, QuarantineRecord, ScoredCandidate

SHARD = re.compile(r"(pairs|skipped|scores|quarantine)-(\d{5})\.parquet$")


def _shards(out_uri: str) -> list[tuple[str, int, str]]:
    filesystem, root = fs.url_to_fs(out_uri)
    if not filesystem.exists(root):
        return []
    found = []
    for path in filesystem.ls(root, detail=False):
        m = SHARD.search(path.rsplit("/", 1)[-1])
        if m:
            found.append((m.group(1), int(m.group(2)), fs.join(out_uri, path.rsplit("/", 1)[-1])))
    return sorted(found, key=lambda t: (t[1], t[0]))


def shard_tables(out_uri: str) -> dict[str, pa.Table]:
    """Each kind's shards of a pairs folder as one table (``pairs``, ``skipped``, ``scores``, ``quarantine``; kinds
    with no shard left out), in shard order."""
    by_kind: dict[str, list[pa.Table]] = {}
    for kind, _, uri in _shards(out_uri):
        by_kind.setdefault(kind, []).append(fs.read_table(uri))
    return {kind: pa.concat_tables(tables, promote_options="default") for kind, tables in by_kind.items()}


def read_pairs(out_uri: str) -> list[PreferencePair]:
    """Every pair of a pairs output folder, in shard order."""
    return [p for kind, _, uri in _shards(out_uri) if kind == "pairs" for p in PreferencePair.from_table(fs.read_table(uri))]


def read_skipped(out_uri: str) -> list[QuarantineRecord]:
    return [q for kind, _, uri in _shards(out_uri) if kind == "skipped" for q in QuarantineRecord.from_table(fs.read_table(uri))]


def read_quarantined(out_uri: str) -> list[QuarantineRecord]:
    """The candidates set aside (``item_id``: the prompt, ``uri``: the video), in prompts paired or skipped."""
    return [q for kind, _, uri in _shards(out_uri) if kind == "quarantine"
            for q in QuarantineRecord.from_table(fs.read_table(uri))]


class PairWriter:
    def __init__(self, out_uri: str):
        self.out_uri = out_uri
        shards = _shards(out_uri)
        self.done: set[str] = {p.prompt_id for p in read_pairs(out_uri)} | {q.item_id for q in read_skipped(out_uri)}
        self._seq = max((seq for _, seq, _ in shards), default=-1) + 1
        for kind, column in (("scores", "prompt_id"), ("quarantine", "item_id")):
            self._drop_undone([uri for k, seq, uri in shards if k == kind and seq == self._seq - 1], column)
        self._pairs: list[PreferencePair] = []
        self._skipped: list[QuarantineRecord] = []
        self._scores: list[ScoredCandidate] = []
        self._quarantined: list[QuarantineRecord] = []
        self.written = {"pairs": 0, "skipped": 0}

    def _drop_undone(self, uris: list[str], column: str) -> None:
        """Rows of prompts (``column``) not done; only the last flush can have been cut short (each opened writer
        checks its predecessor's)."""
        import pyarrow.compute as pc

        for uri in uris:
            table = fs.read_table(uri)
            done = pc.is_in(table[column], value_set=pa.array(sorted(self.done), pa.string()))
            if pc.all(done).as_py() is not False:
                continue
            kept = table.filter(done)
            if kept.num_rows:
                fs.write_table(kept, uri)
            else:
                fs.remove(uri)

    @property
    def pending(self) -> int:
        return len(self._pairs) + len(self._skipped)

    def add(self, result: PreferencePair | QuarantineRecord, scores: Sequence[ScoredCandidate] = (),
            quarantined: Sequence[QuarantineRecord] = ()) -> None:
        """One prompt's outcome, its candidates' scores (``pairs.keep_scores``) and the candidates set aside."""
        prompt_id = result.prompt_id if isinstance(result, PreferencePair) else result.item_id
        if prompt_id in self.done:
            raise RuntimeError(f"prompt {prompt_id!r} is already paired or skipped: refusing to write it twice")
        self.done.add(prompt_id)
        (self._pairs if isinstance(result, PreferencePair) else self._skipped).append(result)
        self._scores.extend(scores)
        self._quarantined.extend(quarantined)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{self._seq:05d}.parquet"
        if self._scores:  # before the shards that make a prompt done, so a cut-off flush loses none of them
            fs.write_table(ScoredCandidate.to_table(self._scores), fs.join(self.out_uri, f"scores-{name}"))
        if self._quarantined:
            fs.write_table(QuarantineRecord.to_table(self._quarantined), fs.join(self.out_uri, f"quarantine-{name}"))
        if self._skipped:
            fs.write_table(QuarantineRecord.to_table(self._skipped), fs.join(self.out_uri, f"skipped-{name}"))
        if self._pairs:  # last: a prompt is done once its pair is on storage
            fs.write_table(PreferencePair.to_table(self._pairs), fs.join(self.out_uri, f"pairs-{name}"))
        self.written["pairs"] += len(self._pairs)
        self.written["skipped"] += len(self._skipped)
        self._pairs, self._skipped, self._scores, self._quarantined = [], [], [], []
        self._seq += 1


PRUNED = "PRUNED.json"  # in a pairs folder whose videos ``run.keep`` deleted (loop/retention.py)


def mark_videos_pruned(out_uri: str, record: dict) -> None:
    fs.write_bytes(fs.join(out_uri, PRUNED), json.dumps(record, indent=2).encode())


def pairs_table(out_uri: str) -> pa.Table:
    """The pairs of ``out_uri`` as a training table; fails, naming the setting, when their videos were pruned."""
    if not fs.exists(out_uri):
        raise ConfigError(f"pairs folder {out_uri} does not exist (a `pairs` run's output: pairs-NNNNN.parquet)")
    if fs.exists(fs.join(out_uri, PRUNED)):
        record = json.loads(fs.read_bytes(fs.join(out_uri, PRUNED)))
        raise ConfigError(f"pairs {out_uri}: their candidate videos were pruned at {record['at']} by "
                          f"{record['setting']}; training reads them (keep more rounds' videos with "
                          f"run.keep.candidate_videos, or 'all')")
    return PreferencePair.to_table(read_pairs(out_uri))
