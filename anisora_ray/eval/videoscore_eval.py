"""VideoScore rows of ``anisora-ray eval`` / ``ablate``: the five VideoScore aspects and their mean for every
held-out video (``<eval folder>/videoscore.parquet`` beside ``scores.parquet``), computed once by a Ray Data actor
pool that loads the model once per actor (``eval.videoscore``; the model: :mod:`anisora_ray.reward.videoscore`)."""

from __future__ import annotations

import numpy as np

from anisora_ray.config.sections import VideoScoreEvalConfig
from anisora_ray.io import fs
from anisora_ray.reward.videoscore import ASPECTS, MAX_NUM_FRAMES

FILE = "videoscore.parquet"
FORMS_FILE = "videoscore.forms.json"  # the model and settings FILE was computed with
COLUMNS = tuple(f"videoscore_{a}" for a in (*ASPECTS, "mean"))


class VideoScoreUDF:
    """Ray Data batch UDF: rows with ``video_uri`` and ``prompt`` → :data:`COLUMNS`, or the reason a video failed."""

    def __init__(self, cfg: VideoScoreEvalConfig, checkpoint: str):
        from anisora_ray.reward.videoscore import VideoScoreModel

        self.model = VideoScoreModel(checkpoint, cfg.device, cfg.dtype, cache_dir=cfg.cache_dir,
                                     num_frames=cfg.num_frames or MAX_NUM_FRAMES)

    def __call__(self, batch: dict) -> dict:
        from anisora_ray.io.video import read_all_frames
        from anisora_ray.reward.videoscore import videoscore_scores

        n = len(batch["video_uri"])
        out = {c: np.full(n, np.nan) for c in COLUMNS}
        reasons = [""] * n
        for i in range(n):
            try:
                scores = videoscore_scores([read_all_frames(str(batch["video_uri"][i]))], [str(batch["prompt"][i])],
                                           self.model)
                for aspect, values in scores.items():
                    out[f"videoscore_{aspect}"][i] = values[0]
            except Exception as exc:  # noqa: BLE001 - one unreadable video keeps NaNs and its reason; the rest go on
                reasons[i] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return {"prompt_id": batch["prompt_id"], "seed": batch["seed"], **out,
                "videoscore_error": np.array(reasons, dtype=object)}


def videoscore_forms(cfg: VideoScoreEvalConfig) -> dict:
    """What VideoScore's numbers depend on: the checkpoint, the frames it sees and its dtype."""
    return {"checkpoint": cfg.checkpoint, "num_frames": cfg.num_frames or MAX_NUM_FRAMES, "dtype": cfg.dtype}


def ensure_videoscore(eval_dir: str, cfg: VideoScoreEvalConfig, regenerate: bool = False) -> str | None:
    """``<eval_dir>/videoscore.parquet`` for every scored (not quarantined) candidate of ``scores.parquet``,
    computed once, and again with ``regenerate`` or when it was computed with another model or settings
    (``videoscore.forms.json``); None when ``eval.videoscore.checkpoint`` is unset."""
    import json

    import pyarrow as pa

    if not cfg.checkpoint:
        return None
    uri, forms_uri = fs.join(eval_dir, FILE), fs.join(eval_dir, FORMS_FILE)
    current = fs.exists(uri) and fs.exists(forms_uri) and json.loads(fs.read_bytes(forms_uri)) == videoscore_forms(cfg)
    if regenerate or not current:
        import ray

        from anisora_ray.models.tiny_reward import resolve_backbone

        checkpoint = resolve_backbone(cfg.checkpoint, cfg.cache_dir)  # a tiny model is built once, here
        rows = [{k: r[k] for k in ("prompt_id", "seed", "video_uri", "prompt")}
                for r in fs.read_table(fs.join(eval_dir, "scores.parquet")).to_pylist() if not r.get("quarantine_reason")]
        resources = {"num_cpus": cfg.num_cpus, **({"num_gpus": cfg.num_gpus} if cfg.num_gpus else {})}
        scored = (ray.data.from_items(rows).map_batches(VideoScoreUDF, fn_constructor_args=(cfg, checkpoint), batch_size=4,
                                                        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                                                        **resources).take_all() if rows else [])
        table = [{"prompt_id": r["prompt_id"], "seed": int(r["seed"]), **{c: float(r[c]) for c in COLUMNS},
                  "videoscore_error": str(r["videoscore_error"] or "")} for r in scored]
        fs.write_table(pa.Table.from_pylist(table, schema=pa.schema(
            [("prompt_id", pa.string()), ("seed", pa.int64()), *((c, pa.float64()) for c in COLUMNS),
             ("videoscore_error", pa.string())])), uri)
        fs.write_bytes(forms_uri, json.dumps(videoscore_forms(cfg), sort_keys=True).encode())
    return uri


def merge_videoscore(rows: list[dict], uri: str) -> None:
    """Add :data:`COLUMNS` to each candidate row (NaN where VideoScore has no value for it), in place."""
    import math

    found = {(r["prompt_id"], int(r["seed"])): r for r in fs.read_table(uri).to_pylist()}
    for r in rows:
        scored = found.get((r["prompt_id"], int(r["seed"])), {})
        r.update({c: scored.get(c, math.nan) for c in COLUMNS})
