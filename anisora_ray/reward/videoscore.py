"""VideoScore (TIGER-Lab, ``TIGER-Lab/VideoScore-v1.1``) as a reward backend and as an evaluation metric.

VideoScore is a Mantis-Idefics2-8B regression with five outputs, the same architecture as the released
AnimeReward smoothness / appeal scorers (:mod:`anisora_ray.reward.released.idefics2`: ``Idefics2Model`` +
``score`` head, the logits at the last token), so it loads through the same ``load_regression`` /
``load_processor`` (safetensors only, the PIL image processor, no image splitting). Scoring as the released
``examples/run_videoscore.py`` of github.com/TIGER-AI-Lab/VideoScore: at most 48 frames sampled as
``np.arange(0, L, L / 48).astype(int)`` (every frame when L <= 48), the five-aspect prompt with the caption
and one ``<image> `` per frame, one clip per forward, each logit ``round(., 3)``, unclamped (trained on
1-4 human ratings). docs/evaluation.md ("VideoScore: what is loaded and how") has the spec and its sources.

Backend ``videoscore`` of five dimensions, each reading one aspect (``aspect``; default below); each
dimension's actor loads its own copy of the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from anisora_ray.errors import ConfigError
from anisora_ray.models.tiny_reward import resolve_backbone
from anisora_ray.reward.base import ClipBatch, register

DEFAULT_CHECKPOINT = "TIGER-Lab/VideoScore-v1.1"
MAX_NUM_FRAMES = 48  # v1.1 (v1: 16)
ROUND_DIGIT = 3
SCORE_RANGE = (1.0, 4.0)  # the ratings it was trained on; the outputs are not clamped
ASPECTS = ("visual_quality", "temporal_consistency", "dynamic_degree", "text_to_video_alignment",
           "factual_consistency")  # the order of the five logits
DIMENSION_ASPECT = {
    "visual_appeal": "visual_quality",
    "visual_smoothness": "temporal_consistency",
    "visual_motion": "dynamic_degree",
    "text_video": "text_to_video_alignment",
    "image_video": "factual_consistency",
}  # character: no VideoScore aspect
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]  # no pickled weights

REGRESSION_QUERY_PROMPT = (
    "\nSuppose you are an expert in judging and evaluating the quality of AI-generated videos,\n"
    "please watch the following frames of a given video and see the text prompt for generating the video,\n"
    "then give scores from 5 different dimensions:\n"
    "(1) visual quality: the quality of the video in terms of clearness, resolution, brightness, and color\n"
    "(2) temporal consistency, both the consistency of objects or humans and the smoothness of motion or movements\n"
    "(3) dynamic degree, the degree of dynamic changes\n"
    "(4) text-to-video alignment, the alignment between the text prompt and the video content\n"
    "(5) factual consistency, the consistency of the video content with the common-sense and factual knowledge\n"
    "\n"
    "for each dimension, output a float number from 1.0 to 4.0,\n"
    "the higher the number is, the better the video performs in that sub-score, \n"
    "the lowest 1.0 means Bad, the highest 4.0 means Perfect/Real (the video is like a real video)\n"
    "Here is an output example:\n"
    "visual quality: 3.2\n"
    "temporal consistency: 2.7\n"
    "dynamic degree: 4.0\n"
    "text-to-video alignment: 2.3\n"
    "factual consistency: 1.8\n"
    "\n"
    "For this video, the text prompt is \"{text_prompt}\",\n"
    "all the frames of video are as follows:\n"
)


def frame_indices(total: int, max_frames: int = MAX_NUM_FRAMES) -> np.ndarray:
    """The released sampling: every frame up to ``max_frames``, else ``np.arange(0, L, L / max_frames)`` floored."""
    if total > max_frames:
        return np.arange(0, total, total / max_frames).astype(int)
    return np.arange(total)


def query_prompt(caption: str, frames: int) -> str:
    """The released prompt: the template with the caption, then ``"<image> "`` once per frame."""
    return REGRESSION_QUERY_PROMPT.format(text_prompt=caption) + "<image> " * frames


def local_checkpoint(spec: str, revision: str | None = None, cache_dir: str = "~/.cache/anisora-ray") -> str:
    """A folder for ``spec``: ``tiny:videoscore`` (built once under ``cache_dir``), a local folder, or a Hub id
    (its json, safetensors and tokenizer files only, into the Hugging Face cache)."""
    path = resolve_backbone(spec, cache_dir)
    if os.path.isdir(path):
        return path
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise ConfigError(f"VideoScore checkpoint {spec!r}: no such folder, and not a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, allow_patterns=HUB_PATTERNS)


class VideoScoreModel:
    """VideoScore loaded once on one device; :meth:`scores` gives the five aspect scores of each clip."""

    def __init__(self, checkpoint: str = DEFAULT_CHECKPOINT, device: str = "auto", dtype: str = "bfloat16",
                 revision: str | None = None, cache_dir: str = "~/.cache/anisora-ray",
                 num_frames: int = MAX_NUM_FRAMES, decimals: int | None = ROUND_DIGIT):
        from anisora_ray.models.pipeline import DTYPES, pick_device
        from anisora_ray.reward.released.common import CheckpointError
        from anisora_ray.reward.released.idefics2 import load_processor, load_regression

        self.path = local_checkpoint(checkpoint, revision, cache_dir)
        self.device = pick_device(device)
        self.model = load_regression(self.path, DTYPES[dtype]).to(self.device)
        if self.model.score.out_features != len(ASPECTS):
            raise CheckpointError(f"{checkpoint}: {self.model.score.out_features} outputs; VideoScore has "
                                  f"{len(ASPECTS)} ({', '.join(ASPECTS)})")
        self.processor = load_processor(self.path)
        self.num_frames, self.decimals = num_frames, decimals

    def inputs(self, frames: np.ndarray, caption: str) -> dict:
        """The processor's tensors for one clip: the sampled frames (PIL, resized by the processor) and the prompt."""
        from PIL import Image

        images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames[frame_indices(len(frames), self.num_frames)]]
        return self.processor(text=query_prompt(caption, len(images)), images=images, return_tensors="pt").to(self.device)

    def scores(self, frames: Sequence[np.ndarray], prompts: Sequence[str]) -> np.ndarray:
        """float [B, 5] in :data:`ASPECTS` order; a row of NaN for a clip with no frame (or no pixel) or a
        non-finite output. One clip per forward, unpadded, as released."""
        import torch

        out = np.full((len(frames), len(ASPECTS)), np.nan)
        with torch.no_grad():
            for i, (clip, caption) in enumerate(zip(frames, prompts, strict=True)):
                if clip.ndim != 4 or 0 in clip.shape[:3]:
                    continue
                inputs = self.inputs(clip, caption)
                inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
                logits = [float(v) for v in self.model(**inputs)[0].float().cpu()]
                out[i] = [round(v, self.decimals) if self.decimals is not None else v for v in logits]
        out[~np.isfinite(out).all(axis=1)] = np.nan
        return out


def videoscore_scores(frames_batch: Sequence[np.ndarray], prompts: Sequence[str],
                      model: VideoScoreModel | str) -> dict[str, np.ndarray]:
    """Evaluation: per clip the five aspects (keys :data:`ASPECTS`) and their ``mean``, NaN for a clip that
    cannot be scored. ``frames_batch``: uint8 [N, H, W, 3] clips at their decoded size (all their frames: 48
    are sampled as released); ``model``: a loaded :class:`VideoScoreModel` (or a checkpoint, loaded here)."""
    if isinstance(model, str):
        model = VideoScoreModel(model)
    scores = model.scores(frames_batch, prompts)
    return {**{a: scores[:, i] for i, a in enumerate(ASPECTS)}, "mean": scores.mean(axis=1)}


class VideoScoreDimension:
    """One VideoScore aspect as a reward dimension (raw score, ~1-4; normalize with ``fixed`` 1..4).

    ``checkpoint``: a Hub id, a folder or ``tiny:videoscore``; ``aspect``: one of :data:`ASPECTS` (default:
    the dimension's own); ``num_frames``: frames sampled per clip (48 as released for v1.1).
    """

    name = ""

    def __init__(self, checkpoint: str = DEFAULT_CHECKPOINT, aspect: str | None = None, device: str = "auto",
                 dtype: str = "bfloat16", revision: str | None = None, cache_dir: str = "~/.cache/anisora-ray",
                 num_frames: int = MAX_NUM_FRAMES):
        self.check_options({"aspect": aspect, "num_frames": num_frames})
        self.aspect = aspect or DIMENSION_ASPECT[self.name]
        self.model = VideoScoreModel(checkpoint, device=device, dtype=dtype, revision=revision, cache_dir=cache_dir,
                                     num_frames=num_frames)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """The option values, checked on the driver before any actor loads 8B weights."""
        where = f"reward.dimensions.{cls.name}.options"
        aspect = options.get("aspect")
        if aspect is not None and aspect not in ASPECTS:
            raise ConfigError(f"{where}.aspect = {aspect!r}: expected one of {list(ASPECTS)}")
        frames = options.get("num_frames", MAX_NUM_FRAMES)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ConfigError(f"{where}.num_frames = {frames!r}: expected a positive integer ({MAX_NUM_FRAMES} as released)")

    def score(self, batch: ClipBatch) -> np.ndarray:
        return self.model.scores(batch.frames, batch.prompts)[:, ASPECTS.index(self.aspect)]


@register("visual_appeal", "videoscore")
class VideoScoreAppeal(VideoScoreDimension):
    name = "visual_appeal"  # visual quality


@register("visual_smoothness", "videoscore")
class VideoScoreSmoothness(VideoScoreDimension):
    name = "visual_smoothness"  # temporal consistency


@register("visual_motion", "videoscore")
class VideoScoreMotion(VideoScoreDimension):
    name = "visual_motion"  # dynamic degree


@register("text_video", "videoscore")
class VideoScoreTextVideo(VideoScoreDimension):
    name = "text_video"  # text-to-video alignment


@register("image_video", "videoscore")
class VideoScoreImageVideo(VideoScoreDimension):
    name = "image_video"  # factual consistency
