import math

import pytest

from anisora_ray.types import Candidate, PreferencePair, PromptItem, QuarantineRecord, ScoredCandidate

CANDIDATE = dict(
    prompt_id="p1", prompt="a cat", image_uri="/img.png", seed=7, candidate_index=0, video_uri="/v.mp4",
    weights_version=2, num_frames=9, height=32, width=32, fps=8, frames_sha256="ab", replica_id="r",
    generate_seconds=0.5, encode_seconds=0.1,
)


@pytest.mark.parametrize(
    "record",
    [
        PromptItem("p1", "a cat", "memory://x.png"),
        PromptItem("p2", "a dog", "memory://y.png", character_id="dog-1"),
        Candidate(**CANDIDATE),
        ScoredCandidate(**CANDIDATE, raw_scores={"motion": 3.5}, scores={"motion": 0.7}, reward=0.61),
        ScoredCandidate(**CANDIDATE, reward=0.0, quarantine_reason="VideoDecodeError: gone"),  # empty maps
        PreferencePair("p1", "a cat", "/i.png", "/w.mp4", "/l.mp4", 1, 2, 0.9, 0.2, 0.7, 3,
                       winner_scores={"motion": 0.9}, loser_scores={"motion": 0.1}),
        QuarantineRecord("generation", "p3", "ImageLoadError", uri="/missing.png", detail="gone"),
    ],
)
def test_records_round_trip_through_arrow(record):
    cls = type(record)
    table = cls.to_table([record])
    assert table.schema == cls.arrow_schema()
    assert cls.from_table(table) == [record]


def test_schema_types_follow_hints():
    schema = ScoredCandidate.arrow_schema()
    assert str(schema.field("seed").type) == "int64"
    assert str(schema.field("scores").type) == "map<string, double>"
    assert schema.field("character_id").nullable and not schema.field("prompt_id").nullable
    assert math.isnan(ScoredCandidate(**CANDIDATE).reward)


def test_missing_field_is_named():
    with pytest.raises(ValueError, match=r"missing field\(s\) \['image_uri'\]"):
        PromptItem.from_dict({"prompt_id": "p", "prompt": "x"})
