"""Weight-free backends of the six dimensions, after established video-quality measures (VBench family).

They need no checkpoints, so the embedded default scores meaningfully on CPU. Each returns a raw
score per clip (higher is better); :mod:`anisora_ray.reward.aggregate` normalizes them.

- visual_smoothness: 1 - mean residual of interpolating each inner frame from its neighbours
  (VBench's motion smoothness with linear interpolation in place of a learned interpolator).
- visual_motion: mean optical-flow magnitude (OpenCV Farneback) per frame pair, as a fraction
  of the frame width (VBench's dynamic degree with Farneback in place of RAFT).
- visual_appeal: mean over keyframes of colourfulness (Hasler & Suesstrunk), contrast (luma
  standard deviation) and sharpness (variance of the Laplacian), each squashed to [0, 1).
- image_video: mean SSIM of the first frames against the first-frame image.
- character: mean over frames of the hue-saturation histogram similarity between the frame's
  foreground and the reference image's foreground (background = colour of the image border).
- text_video: a documented stand-in for a text-image model: the colour words of the prompt
  (red, pink, blue, ...) and how much of each named colour the clip shows. A prompt with no
  colour word scores 0.5 for every clip, which leaves the ranking within a prompt unchanged.
"""

from __future__ import annotations

import re

import cv2
import numpy as np
from skimage.metrics import structural_similarity

from anisora_ray.drawing import COLOURS
from anisora_ray.reward.base import ClipBatch, register


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _resize_like(image: np.ndarray, frame: np.ndarray) -> np.ndarray:
    h, w = frame.shape[:2]
    if image.shape[:2] == (h, w):
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def _squash(x: float, scale: float) -> float:
    return float(1.0 - np.exp(-max(x, 0.0) / scale))


class _PerClip:
    """Scores clip by clip; a clip too short for the measure gets NaN (quarantined downstream)."""

    name = ""
    min_frames = 1

    def score(self, batch: ClipBatch) -> np.ndarray:
        out = np.full(len(batch), np.nan)
        for i in range(len(batch)):
            if batch.frames[i].shape[0] >= self.min_frames:
                out[i] = self.score_clip(batch, i)
        return out

    def score_clip(self, batch: ClipBatch, i: int) -> float:
        raise NotImplementedError


@register("visual_smoothness", "classical")
class InterpolationSmoothness(_PerClip):
    name = "visual_smoothness"
    min_frames = 3

    def score_clip(self, batch: ClipBatch, i: int) -> float:
        f = batch.frames[i].astype(np.float32) / 255.0
        residual = np.abs((f[:-2] + f[2:]) / 2.0 - f[1:-1]).mean()
        return float(1.0 - residual)


@register("visual_motion", "classical")
class OpticalFlowMotion(_PerClip):
    name = "visual_motion"
    min_frames = 2

    def score_clip(self, batch: ClipBatch, i: int) -> float:
        gray = [_gray(f) for f in batch.frames[i]]
        magnitudes = []
        for a, b in zip(gray[:-1], gray[1:], strict=True):
            flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)
            magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
        return float(np.mean(magnitudes)) / gray[0].shape[1]


@register("visual_appeal", "classical")
class ColourContrastSharpness(_PerClip):
    name = "visual_appeal"

    def __init__(self, keyframes: int = 4):
        self.keyframes = keyframes

    @staticmethod
    def frame_appeal(frame: np.ndarray) -> float:
        rgb = frame.astype(np.float32)
        rg = rgb[..., 0] - rgb[..., 1]
        yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
        colourfulness = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
        gray = _gray(frame)
        contrast = float(gray.std())
        sharpness = float(cv2.Laplacian(gray, cv2.CV_64F).var())
        return (_squash(colourfulness, 50.0) + _squash(contrast, 40.0) + _squash(sharpness, 300.0)) / 3.0

    def clip_appeal(self, clip: np.ndarray) -> float:
        picks = np.linspace(0, len(clip) - 1, min(self.keyframes, len(clip))).round().astype(int)
        return float(np.mean([self.frame_appeal(clip[k]) for k in picks]))

    def score_clip(self, batch: ClipBatch, i: int) -> float:
        return self.clip_appeal(batch.frames[i])


@register("image_video", "classical")
class EarlyFrameSSIM(_PerClip):
    name = "image_video"

    def __init__(self, early_frames: int = 4):
        self.early_frames = early_frames

    def score_clip(self, batch: ClipBatch, i: int) -> float:
        clip = batch.frames[i][: self.early_frames]
        image = _resize_like(batch.images[i], clip[0])
        side = min(clip.shape[1:3])
        win = 7 if side >= 7 else side - (1 - side % 2)  # SSIM needs an odd window inside the frame
        return float(
            np.mean([structural_similarity(image, f, channel_axis=-1, data_range=255, win_size=win) for f in clip])
        )


def _foreground_mask(frame: np.ndarray) -> np.ndarray:
    """Pixels far from the median border colour (Otsu threshold on the distance)."""
    border = np.concatenate([frame[0], frame[-1], frame[:, 0], frame[:, -1]]).astype(np.float32)
    distance = np.linalg.norm(frame.astype(np.float32) - np.median(border, axis=0), axis=-1)
    scaled = np.clip(distance / max(distance.max(), 1e-6) * 255, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask


def _hs_histogram(frame: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(frame, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], _foreground_mask(frame), [18, 8], [0, 180, 0, 256])
    return cv2.normalize(hist, None, alpha=1.0, norm_type=cv2.NORM_L1)


@register("character", "classical")
class ForegroundHistogramIdentity(_PerClip):
    name = "character"

    def score_clip(self, batch: ClipBatch, i: int) -> float:
        clip = batch.frames[i]
        reference = batch.references[i] if batch.references[i] is not None else batch.images[i]
        ref_hist = _hs_histogram(_resize_like(reference, clip[0]))
        distances = [cv2.compareHist(ref_hist, _hs_histogram(f), cv2.HISTCMP_BHATTACHARYYA) for f in clip]
        return float(1.0 - np.mean(distances))


# Colour words and their RGB anchors for the text-video stand-in.
COLOUR_WORDS = {  # RGB anchors: the demo's own colours (drawing.COLOURS) and four more names
    **COLOURS,
    "red": (220, 40, 40),
    "yellow": (240, 220, 60),
    "black": (20, 20, 20),
    "brown": (140, 90, 50),
}


NEUTRAL_ANCHORS = {"grey": (128, 128, 128)}  # greys are nearest to this, not to white or black
_NAMES = [*COLOUR_WORDS, *NEUTRAL_ANCHORS]
_ANCHORS = np.asarray([*COLOUR_WORDS.values(), *NEUTRAL_ANCHORS.values()], np.float32)


def colour_names(pixels: np.ndarray, tolerance: float) -> np.ndarray:
    """Per pixel of ``pixels`` (uint8 [N, 3]) the index in ``_NAMES`` of the colour a person would call it:
    the nearest anchor among all named colours (so a pinkish orange is orange, not pink), or -1 when even
    that one is ``tolerance`` or farther away (RGB distance)."""
    distance = np.linalg.norm(pixels.astype(np.float32)[:, None, :] - _ANCHORS[None], axis=-1)
    nearest = distance.argmin(axis=1)
    return np.where(distance[np.arange(len(nearest)), nearest] < tolerance, nearest, -1)


def named_colour_share(names: np.ndarray, word: str) -> float:
    """Share of pixels :func:`colour_names` called ``word``."""
    return float((names == _NAMES.index(word)).mean())


@register("text_video", "classical")
class ColourWordAgreement(_PerClip):
    """Weight-free text-video stand-in: does the clip keep the colour its prompt names?

    Per colour word, the share of the clip's pixels named that colour (:func:`named_colour_share`) over
    the share in the input image: 1 when the clip shows the named colour as much as its image does, lower
    as it fades, no extra reward for painting more of it. When the image shows less than
    ``min_image_share`` of the colour, the clip's share over ``expected_share`` (capped at 1) is used.
    Limits: colour words only (no species, action or scene), RGB anchors of ten names; a prompt without a
    colour word scores 0.5. docs/alignment.md has what this proxy did in training.
    """

    name = "text_video"

    def __init__(self, tolerance: float = 80.0, expected_share: float = 0.05, min_image_share: float = 0.01):
        self.tolerance = tolerance
        self.expected_share = expected_share
        self.min_image_share = min_image_share

    def score_clip(self, batch: ClipBatch, i: int) -> float:
        words = [w for w in re.findall(r"[a-z]+", batch.prompts[i].lower()) if w in COLOUR_WORDS]
        if not words:
            return 0.5
        frames = batch.frames[i]
        image = cv2.resize(batch.images[i], (frames.shape[2], frames.shape[1]), interpolation=cv2.INTER_AREA)
        names = colour_names(frames.reshape(-1, 3), self.tolerance)  # once per clip, whatever the words
        image_names = colour_names(image.reshape(-1, 3), self.tolerance)
        scores = []
        for word in dict.fromkeys(words):
            share = named_colour_share(names, word)
            reference = named_colour_share(image_names, word)
            if reference >= self.min_image_share:
                scores.append(min(1.0, share / reference))
            else:
                scores.append(min(1.0, share / self.expected_share))
        return float(np.mean(scores))
