"""Records passed between stages, and their Arrow schemas.

The data flows one way::

    PromptItem -> Candidate -> ScoredCandidate -> PreferencePair

Every record is a frozen dataclass whose Arrow schema is derived from its type hints, so a
parquet file of records and the records in memory never disagree.
"""

from __future__ import annotations

import dataclasses
import types as _pytypes
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pyarrow as pa

R = TypeVar("R", bound="Record")

# The six AnimeReward dimensions, in the paper's order.
DIMENSIONS = (
    "visual_smoothness",
    "visual_motion",
    "visual_appeal",
    "text_video",
    "image_video",
    "character",
)

_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
}


def _arrow_type(hint: Any) -> tuple[pa.DataType, bool]:
    """Arrow type and nullability of one type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, _pytypes.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union {hint!r}")
        return _arrow_type(args[0])[0], True
    if origin is dict:
        key, value = typing.get_args(hint)
        return pa.map_(_SCALARS[key], _SCALARS[value]), False
    if hint in _SCALARS:
        return _SCALARS[hint], False
    raise TypeError(f"unsupported field type {hint!r}")


@dataclass(frozen=True)
class Record:
    """Base of all stage records: schema derivation and table conversion."""

    _schema_cache: ClassVar[dict[type, pa.Schema]] = {}

    @classmethod
    def arrow_schema(cls) -> pa.Schema:
        if cls not in Record._schema_cache:
            hints = typing.get_type_hints(cls)
            fields = []
            for f in dataclasses.fields(cls):
                arrow_type, nullable = _arrow_type(hints[f.name])
                fields.append(pa.field(f.name, arrow_type, nullable=nullable))
            Record._schema_cache[cls] = pa.schema(fields)
        return Record._schema_cache[cls]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[R], row: dict[str, Any]) -> R:
        names = [f.name for f in dataclasses.fields(cls)]
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [n for n in required if n not in row]
        if missing:
            raise ValueError(f"{cls.__name__} record is missing field(s) {missing}: {row!r}")
        maps = {f.name for f in cls.arrow_schema() if pa.types.is_map(f.type)}
        values = {}
        for name in names:
            if name not in row:
                continue
            value = row[name]
            if name in maps and isinstance(value, list):
                value = dict(value)  # Arrow maps come back as lists of (key, value)
            values[name] = value
        return cls(**values)

    @classmethod
    def to_table(cls, records: typing.Iterable[Record]) -> pa.Table:
        return pa.Table.from_pylist([r.to_dict() for r in records], schema=cls.arrow_schema())

    @classmethod
    def from_table(cls: type[R], table: pa.Table) -> list[R]:
        return [cls.from_dict(row) for row in table.to_pylist()]


MAX_ID_BYTES = 200  # a file name's limit is 255 bytes on common file systems


def id_problem(item_id: object) -> str | None:
    """Why ``item_id`` cannot name a folder of its own (a prompt's videos go to ``videos/<prompt_id>/``), or None:
    a separator, ``.``/``..`` or an absolute path would write outside the output folder."""
    if not isinstance(item_id, str) or not item_id:
        return "must be non-empty text"
    if "/" in item_id or "\\" in item_id:
        return "contains a path separator (/ or \\)"
    if item_id in (".", ".."):
        return "is a relative folder name"
    if any(ord(c) < 32 or ord(c) == 127 for c in item_id):
        return "contains a control character"
    if len(item_id.encode("utf-8")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes in UTF-8"
    return None


@dataclass(frozen=True)
class PromptItem(Record):
    """One row of a prompt manifest: a prompt and its first-frame image."""

    prompt_id: str
    prompt: str
    image_uri: str
    character_id: str | None = None

    def __post_init__(self):
        problem = id_problem(self.prompt_id)
        if problem:
            raise ValueError(f"prompt_id {self.prompt_id!r} {problem}")


@dataclass(frozen=True)
class Candidate(Record):
    """One generated video for a prompt, written to ``video_uri``."""

    prompt_id: str
    prompt: str
    image_uri: str
    seed: int
    candidate_index: int
    video_uri: str
    weights_version: int
    num_frames: int
    height: int
    width: int
    fps: int
    frames_sha256: str
    replica_id: str
    generate_seconds: float
    encode_seconds: float
    character_id: str | None = None


@dataclass(frozen=True)
class ScoredCandidate(Candidate):
    """A candidate with raw and normalized scores per reward dimension and the combined reward."""

    raw_scores: dict[str, float] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    reward: float = float("nan")  # NaN when quarantined
    quarantine_reason: str | None = None

    @classmethod
    def from_candidate(cls, candidate: Candidate, **scores: Any) -> ScoredCandidate:
        fields = {f.name: getattr(candidate, f.name) for f in dataclasses.fields(Candidate)}
        return cls(**fields, **scores)


@dataclass(frozen=True)
class PreferencePair(Record):
    """The best (winner) and worst (loser) candidate of one prompt, with both rewards and their gap."""

    prompt_id: str
    prompt: str
    image_uri: str
    winner_video_uri: str
    loser_video_uri: str
    winner_seed: int
    loser_seed: int
    winner_reward: float
    loser_reward: float
    reward_gap: float
    weights_version: int
    winner_scores: dict[str, float] = field(default_factory=dict)
    loser_scores: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class WeightsVersion(Record):
    """One published version of the generator's trained weights (full transformer or LoRA adapter)."""

    version: int
    kind: str  # "full" | "lora"
    uri: str  # the folder holding the safetensors
    checksum: str  # tensors_checksum of what was published
    num_bytes: int
    num_tensors: int


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and the seeds of its candidates (what a generator replica is asked to render)."""

    item: PromptItem
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class QuarantineRecord(Record):
    """An item set aside by a stage, with the reason; nothing is dropped silently."""

    stage: str
    item_id: str
    reason: str
    uri: str | None = None
    detail: str | None = None
