"""Released visual smoothness and visual appeal: two Mantis-Idefics2-8B regression checkpoints
(``...-24frame-benchmark-...-regression`` and ``...-24frame-quality-...-regression``).

Both are transformers folders of Mantis' ``Idefics2ForSequenceClassification``: ``Idefics2Model``
under ``model.`` plus ``score = Linear(4096, num_labels, bias=True)``; transformers has no such
class, so :class:`Idefics2ForRegression` is that thin subclass (identical keys, loaded with
``from_pretrained``, safetensors only). Fidelity to the Mantis fork: the perceiver's RMSNorm eps is
the text model's (Mantis used ``text_config.rms_norm_eps`` everywhere), and all frames of a clip have
one size, so the patch masks agree. Scoring as ``reward_infer.py``: both models get the same
*quality* prompt with the caption and one ``<image>`` per sampled frame, the logit at the last
token (before the first pad), ``round(logit, 3) / 100``, unclamped. The image processor is the PIL
one (``backend="pil"``), as the models were trained with (transformers 4.45's slow processor: PIL
bilinear resize to the configured shortest/longest edge, rescale, mean = std = 0.5); transformers 5
would otherwise pick the torchvision one where torchvision is installed.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.reward.released.common import CheckpointError

REGRESSION_QUERY_PROMPT = (
    "\nSuppose you are an expert in judging and evaluating the quality of AI-generated videos,\n"
    "please watch the following frames of a given video and see the text prompt for generating the video,\n"
    "then give scores from quality dimensions: the quality of the video in terms of clearness, resolution, "
    "brightness, and color\n\nOutput a float number from 0 to 100,\nthe higher the number is, the better the video "
    "performs in that sub-score, \nthe lowest 0 means Bad, the highest 100 means Perfect/Real (the video is like a "
    "real video)\n\nFor this video, the text prompt is \"{text_prompt}\",\nall the frames of video are as follows:\n"
)


def _regression_class():
    from transformers import Idefics2Model
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PreTrainedModel

    class Idefics2ForRegression(Idefics2PreTrainedModel):
        """Mantis' ``Idefics2ForSequenceClassification`` (regression): the logits of the last real token."""

        def __init__(self, config):
            super().__init__(config)
            config.perceiver_config.rms_norm_eps = config.text_config.rms_norm_eps  # as the Mantis fork computed
            self.model = Idefics2Model(config)
            self.score = nn.Linear(config.text_config.hidden_size, getattr(config, "num_labels", 1), bias=True)
            self.post_init()

        def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                                pixel_attention_mask=pixel_attention_mask).last_hidden_state
            logits = self.score(hidden)
            pad = getattr(self.config, "pad_token_id", None)
            if pad is None:
                last = torch.full((input_ids.shape[0],), input_ids.shape[-1] - 1, device=input_ids.device)
            else:  # the token before the first pad; with none, (0 - 1) mod L = the last
                last = (torch.eq(input_ids, pad).int().argmax(-1) - 1) % input_ids.shape[-1]
            return logits[torch.arange(input_ids.shape[0], device=logits.device), last]

    return Idefics2ForRegression


def load_regression(path: str, dtype=torch.bfloat16):
    """A released Mantis-Idefics2 regression folder; any missing, unexpected or misshapen weight is an error."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} is not a Mantis-Idefics2 regression folder (no config.json)")
    model, info = _regression_class().from_pretrained(path, dtype=dtype, use_safetensors=True, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"{path}: " + "; ".join(f"{k} {sorted(map(str, v))[:5]}" for k, v in bad.items()))
    return model.eval()


def convert_regression(path: str, out_dir: str) -> str:
    """A folder with ``.bin`` weights (read with ``weights_only=True``) → the same folder in safetensors;
    one that already has safetensors is only checked (load it from where it is)."""
    from transformers import AutoProcessor

    if any(n.endswith(".safetensors") for n in os.listdir(path)):
        load_regression(path)
        return path
    model, info = _regression_class().from_pretrained(path, use_safetensors=False, output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise CheckpointError(f"{path}: missing {sorted(info['missing_keys'])[:5]}, mismatched {info['mismatched_keys'][:5]}")
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoProcessor.from_pretrained(path, backend="pil").save_pretrained(out_dir)
    return out_dir


def load_processor(path: str):
    """The folder's ``Idefics2Processor`` with the PIL image processor, without image splitting (as trained)."""
    from transformers import AutoProcessor
    from transformers.image_processing_backends import PilBackend

    processor = AutoProcessor.from_pretrained(path, do_image_splitting=False, backend="pil")
    if not isinstance(processor.image_processor, PilBackend):
        raise CheckpointError(f"{path}: got {type(processor.image_processor).__name__}, not the PIL Idefics2 processor")
    return processor


class _ReleasedIdefics2:
    name = ""

    def __init__(self, checkpoint: str | None = None, source: str = "IndexTeam/Index-anisora", device: str = "auto",
                 dtype: str = "bfloat16", frames: int | None = None, decimals: int | None = 3,
                 cache_dir: str = "~/.cache/anisora-ray"):
        from anisora_ray.models.pipeline import DTYPES, pick_device
        from anisora_ray.reward.released.convert import resolve_checkpoint

        checkpoint = resolve_checkpoint(self.name, checkpoint, source, cache_dir)

        self.device = pick_device(device)
        self.model = load_regression(checkpoint, DTYPES[dtype]).to(self.device)
        self.processor = load_processor(checkpoint)
        self.frames, self.decimals = frames, decimals  # None: every sampled frame (24 in the released setup)

    def inputs(self, frames: np.ndarray, caption: str) -> dict:
        from PIL import Image

        from anisora_ray.reward.learned import even_indices

        if self.frames is not None:
            frames = frames[even_indices(len(frames), min(self.frames, len(frames)))]
        prompt = REGRESSION_QUERY_PROMPT.format(text_prompt=caption) + "<image> " * len(frames)
        images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
        return self.processor(text=prompt, images=images, return_tensors="pt").to(self.device)

    @torch.no_grad()
    def score(self, batch: ClipBatch) -> np.ndarray:
        out = []
        for frames, caption in zip(batch.frames, batch.prompts, strict=True):  # one clip per call, unpadded, as released
            inputs = self.inputs(frames, caption)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            logit = float(self.model(**inputs)[0, 0].float())
            out.append((round(logit, self.decimals) if self.decimals is not None else logit) / 100.0)
        return np.asarray(out, dtype=float)


@register("visual_smoothness", "released")
class ReleasedSmoothness(_ReleasedIdefics2):
    """``checkpoint``: the released ``...-24frame-benchmark-1epoch_4096_regression/checkpoint-final`` folder."""

    name = "visual_smoothness"


@register("visual_appeal", "released")
class ReleasedAppeal(_ReleasedIdefics2):
    """``checkpoint``: the released ``...-24frame-quality_4096_regression/checkpoint-final`` folder."""

    name = "visual_appeal"
