"""Learned backends of five dimensions (the sixth, character, is in :mod:`anisora_ray.reward.character`).

All load from a Hugging Face id, a local folder, or ``tiny:<kind>`` (see
:mod:`anisora_ray.models.tiny_reward`), and share the option names ``backbone``, ``head``,
``device``, ``dtype``, ``revision``, ``cache_dir``, ``max_images``:

- visual_motion (``xclip``): X-CLIP, as ActionCLIP in the released code: softmax over
  100 × cosine(video, prompt) for a pair of motion prompts; the score is the first's probability.
- visual_appeal (``siglip``): SigLIP features of ``keyframes`` frames → regression head, mean over keyframes.
- visual_smoothness (``learned``): per consecutive frame pair the features [f_t, f_t+1 − f_t] →
  regression head, mean over pairs (a vision encoder + regression head, as Mantis-Idefics2 in the paper).
- text_video / image_video (``clip``): mean-pooled frame features against the prompt / the first-frame
  image: head on [v, u, v·u] with a sigmoid output, or cosine similarity when no head is given.

A learned dimension exposes ``tokens(batch)`` (the head's inputs, one [K, D] tensor per clip) so
``anisora-ray train-reward`` can fit its head; ``score`` is ``head(tokens)``.
"""

from __future__ import annotations

import numpy as np
import torch

from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.reward.encoders import Backbone, RegressionHead, l2

MOTION_PROMPTS = (
    "The protagonist has a large range of movement, such as running, jumping, dancing, or waving arms.",
    "The protagonist remain stationary in the video with no apparent movement.",
)


def even_indices(n: int, k: int) -> np.ndarray:
    """``k`` frame indices spread evenly over ``n`` (repeats when ``n < k``), as ``torch.linspace(0, n-1, k).long()``."""
    return np.linspace(0, n - 1, k).astype(np.int64)


class LearnedDimension:
    """A frozen backbone plus an optional regression head."""

    name = ""
    head_output = "identity"
    needs_head = True
    needs_text = False

    def __init__(self, backbone: str, head: str | None = None, device: str = "auto", dtype: str = "float32",
                 revision: str | None = None, cache_dir: str = "~/.cache/anisora-ray", max_images: int = 256,
                 adapter: str | None = None, training: bool = False):
        self.backbone = Backbone(backbone, device=device, dtype=dtype, revision=revision, cache_dir=cache_dir,
                                 max_images=max_images, text=self.needs_text, adapter=adapter)
        if head is None and self.needs_head and not training:
            raise ValueError(f"{self.name}: option 'head' is required (a folder with head.safetensors); "
                             "fit one with `anisora-ray train-reward`")
        self.head = RegressionHead.load(head, self.backbone.device) if head else None

    def tokens(self, batch: ClipBatch) -> list[torch.Tensor]:
        raise NotImplementedError

    def zero_shot(self, batch: ClipBatch) -> np.ndarray:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, batch: ClipBatch) -> np.ndarray:
        if len(batch) == 0:
            return np.zeros(0)
        if self.head is None:
            return self.zero_shot(batch)
        return np.array([float(self.head(t)) for t in self.tokens(batch)])

    def _frame_features(self, clips: list[np.ndarray]) -> list[torch.Tensor]:
        """Features of every frame of every clip in one batched pass, split back per clip."""
        feats = self.backbone.image_features(np.concatenate(clips))
        return list(torch.split(feats, [len(c) for c in clips]))


@register("visual_motion", "xclip")
class XClipMotion(LearnedDimension):
    name = "visual_motion"
    needs_head = False
    needs_text = True

    def __init__(self, backbone: str = "microsoft/xclip-base-patch32", prompts: list[str] | tuple[str, ...] = MOTION_PROMPTS,
                 temperature: float = 100.0, **options):
        super().__init__(backbone, **options)
        if len(prompts) < 2:
            raise ValueError(f"visual_motion needs at least two prompts (moving first), got {len(prompts)}")
        self.temperature = float(temperature)
        limit = int(self.backbone.model.config.text_config.max_position_embeddings)
        self.prompt_tokens = self.backbone.tokenizer(list(prompts), padding=True, truncation=True, max_length=limit,
                                                     return_tensors="pt").to(self.backbone.device)

    def zero_shot(self, batch: ClipBatch) -> np.ndarray:
        """Through X-CLIP's own forward: the prompt embeddings are conditioned on each video by its
        prompt generator (as the model was trained), then softmax over temperature × cosine."""
        k = self.backbone.num_frames or 8
        pix = torch.stack([self.backbone.pixels(c[even_indices(len(c), k)]) for c in batch.frames])
        out = self.backbone.model(pixel_values=pix, **self.prompt_tokens)
        cos = torch.einsum("bd,bkd->bk", l2(out.video_embeds.float()), l2(out.text_embeds.float()))
        return (self.temperature * cos).softmax(dim=-1)[:, 0].cpu().numpy().astype(float)


@register("visual_appeal", "siglip")
class SiglipAppeal(LearnedDimension):
    name = "visual_appeal"

    def __init__(self, backbone: str = "google/siglip-so400m-patch14-384", keyframes: int = 8, **options):
        super().__init__(backbone, **options)
        self.keyframes = int(keyframes)

    def tokens(self, batch: ClipBatch) -> list[torch.Tensor]:
        clips = [c[even_indices(len(c), min(self.keyframes, len(c)))] for c in batch.frames]
        return [l2(f) for f in self._frame_features(clips)]


@register("visual_smoothness", "learned")
class FramePairSmoothness(LearnedDimension):
    name = "visual_smoothness"

    def __init__(self, backbone: str = "openai/clip-vit-large-patch14", **options):
        super().__init__(backbone, **options)

    def tokens(self, batch: ClipBatch) -> list[torch.Tensor]:
        out = []
        for f in self._frame_features(list(batch.frames)):
            f = l2(f)
            if len(f) < 2:  # a single frame has no motion to judge: pair it with itself
                f = torch.cat([f, f])
            out.append(torch.cat([f[:-1], f[1:] - f[:-1]], dim=-1))
        return out


class _ClipConsistency(LearnedDimension):
    """Mean-pooled frame features against one reference feature per clip."""

    head_output = "sigmoid"
    needs_head = False

    def __init__(self, backbone: str = "openai/clip-vit-large-patch14", **options):
        super().__init__(backbone, **options)

    def references(self, batch: ClipBatch) -> torch.Tensor:
        raise NotImplementedError

    def _pairs(self, batch: ClipBatch) -> tuple[torch.Tensor, torch.Tensor]:
        video = l2(torch.stack([f.mean(0) for f in self._frame_features(list(batch.frames))]))
        return video, l2(self.references(batch))

    def tokens(self, batch: ClipBatch) -> list[torch.Tensor]:
        v, u = self._pairs(batch)
        return list(torch.cat([v, u, v * u], dim=-1).unsqueeze(1))

    def zero_shot(self, batch: ClipBatch) -> np.ndarray:
        v, u = self._pairs(batch)
        return (v * u).sum(-1).cpu().numpy().astype(float)


@register("text_video", "clip")
class ClipTextVideo(_ClipConsistency):
    name = "text_video"
    needs_text = True

    def references(self, batch: ClipBatch) -> torch.Tensor:
        return self.backbone.text_features(list(batch.prompts))


@register("image_video", "clip")
class ClipImageVideo(_ClipConsistency):
    name = "image_video"

    def references(self, batch: ClipBatch) -> torch.Tensor:
        return self.backbone.image_features(np.stack([_square(im, batch.frames[0].shape[1:3]) for im in batch.images]))


def _square(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize the first-frame image to the clip's frame size so images of any size stack."""
    import cv2

    if image.shape[:2] == tuple(hw):
        return image
    return cv2.resize(image, (hw[1], hw[0]), interpolation=cv2.INTER_AREA)


def token_dim(dimension: LearnedDimension) -> int:
    """The width of the head's input for ``dimension`` (probed on one black clip)."""
    frame = np.zeros((2, 32, 32, 3), np.uint8)
    batch = ClipBatch(frames=[frame], prompts=["probe"], images=[frame[0]], references=[None])
    with torch.no_grad():
        return int(dimension.tokens(batch)[0].shape[-1])
