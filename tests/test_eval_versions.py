"""``anisora-ray eval`` reads back what an earlier evaluation wrote (in ``--out``, or the align job's round folder)
only when it is of this config's held-out prompts and seeds and of the version's weights."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from anisora_ray.errors import ConfigError
from anisora_ray.eval.heldout import EVAL_ROUND
from anisora_ray.eval.versions import Version, version_rows
from anisora_ray.generation.seeding import candidate_seeds
from anisora_ray.io import fs
from anisora_ray.types import PromptItem


def _scores(cfg, items, folder, k: int, run_seed: int | None = None, weights: str | None = None) -> None:
    """A scores.parquet as an evaluation of ``k`` seeds per prompt writes it (and its version.json)."""
    seed = cfg.run.seed if run_seed is None else run_seed
    rows = [{"prompt_id": i.prompt_id, "seed": s, "reward": 0.5, "quarantine_reason": ""}
            for i in items for s in candidate_seeds(seed, i.prompt_id, k, EVAL_ROUND)]
    fs.write_table(pa.Table.from_pylist(rows), fs.join(str(folder), "scores.parquet"))
    (folder / "version.json").write_text(json.dumps({"weights_uri": weights}))


def test_scores_read_back_must_be_of_this_configs_prompts_seeds_and_weights(make_config, tmp_path):
    cfg = make_config("eval.candidates_per_prompt=2", "eval.metrics.enabled=false",
                      "eval.videoscore.checkpoint=null")
    items = [PromptItem(f"h{i}", f"prompt {i}", "img.png") for i in range(3)]
    align_eval = tmp_path / "align" / "round-0" / "eval"
    align_eval.mkdir(parents=True)
    _scores(cfg, items, align_eval, 2)
    out = str(tmp_path / "eval")
    rows = version_rows(cfg, Version("round-0", None, str(align_eval)), items, out, None, False, False)
    assert len(rows) == 6  # align's, copied, as this config asks for them
    assert json.loads((tmp_path / "eval" / "round-0" / "eval" / "version.json").read_text()) == {"weights_uri": None}
    more = make_config("eval.candidates_per_prompt=4", "eval.metrics.enabled=false",
                       "eval.videoscore.checkpoint=null")
    with pytest.raises(ConfigError, match=r"round-0: the held-out scores in .* are not this run's: it has 2 seed\(s\) per "
                                          r"prompt at most, this config's eval.candidates_per_prompt is 4; evaluate "
                                          r"with --regenerate"):
        version_rows(more, Version("round-0", None, str(align_eval)), items, str(tmp_path / "fresh"), None, False, False)
    other_seed = make_config("eval.candidates_per_prompt=2", "eval.metrics.enabled=false",
                             "eval.videoscore.checkpoint=null", "run.seed=99")
    with pytest.raises(ConfigError, match="6 of its 6 candidates are of other prompts or seeds"):
        version_rows(other_seed, Version("round-0", None, str(align_eval)), items, out, None, False, False)
    # the same label in the same --out, now naming other weights: not the earlier version's numbers
    mine = tmp_path / "eval" / "mine" / "eval"
    mine.mkdir(parents=True)
    (tmp_path / "a").mkdir()
    _scores(cfg, items, mine, 2, weights=str(tmp_path / "a"))
    assert len(version_rows(cfg, Version("mine", str(tmp_path / "a")), items, out, None, False, False)) == 6
    with pytest.raises(ConfigError, match=r"mine: .* it was generated from weights .*/a, this version names .*/b"):
        version_rows(cfg, Version("mine", str(tmp_path / "b")), items, out, None, False, False)
