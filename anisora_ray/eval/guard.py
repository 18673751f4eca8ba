"""Reward-hacking guard: held-out measures the training reward does not contain, and the test that fires it.

Each AnimeReward dimension gets a measure computed another way (weight-free here; the VBench-style
learned forms of :mod:`anisora_ray.eval.vbench` join on GPU configs):

| guards             | measure                | how                                                            |
| ------------------ | ---------------------- | -------------------------------------------------------------- |
| visual_motion      | ``frame_difference``   | mean absolute difference of consecutive frames / 255 (no flow) |
| image_video        | ``first_frame_psnr``   | PSNR (dB) of the first frame against the input image           |
| text_video         | ``named_hue_share``    | share of saturated pixels within ±16° hue of the colour the    |
|                    |                        | prompt names (HSV; not the reward's RGB distance); prompts     |
|                    |                        | naming no chromatic colour are left out                         |
| character          | ``subject_consistency``| VBench-I2V subject consistency (eval/vbench.py)                |
| visual_smoothness  | ``motion_smoothness``  | VBench motion smoothness (eval/vbench.py)                      |
| visual_appeal      | ``aesthetic_quality``  | LAION predictor where configured, else classical (eval/vbench) |

The guard fires for a round when its held-out reward rose over round 0 while a measure fell over
round 0 by more than ``margin`` (relative to round 0's mean) with a paired permutation p below
``alpha`` over held-out prompts: the reward went up, the property it stands for went down.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from anisora_ray.eval.stats import paired_comparison

GUARDS = {"frame_difference": "visual_motion", "first_frame_psnr": "image_video", "named_hue_share": "text_video",
          "subject_consistency": "character", "motion_smoothness": "visual_smoothness",
          "aesthetic_quality": "visual_appeal"}
OWN_MEASURES = ("frame_difference", "first_frame_psnr", "named_hue_share")
HUES = {"red": 0, "orange": 15, "yellow": 30, "green": 60, "blue": 108, "purple": 140, "pink": 165}  # OpenCV hue /180


def frame_difference(frames: np.ndarray) -> float:
    return float(np.abs(np.diff(frames.astype(np.float32), axis=0)).mean() / 255.0) if len(frames) > 1 else math.nan


def first_frame_psnr(frames: np.ndarray, image: np.ndarray) -> float:
    image = cv2.resize(image, (frames.shape[2], frames.shape[1]), interpolation=cv2.INTER_AREA)
    return min(60.0, float(cv2.PSNR(np.ascontiguousarray(frames[0]), np.ascontiguousarray(image))))  # identical: 60


def named_hue_share(frames: np.ndarray, prompt: str, tolerance: int = 8) -> float:
    """Share of saturated, not-dark pixels whose hue is within ``tolerance`` (OpenCV units, 2° each) of a named colour."""
    names = [w for w in re.findall(r"[a-z]+", prompt.lower()) if w in HUES]
    if not names:
        return math.nan
    hsv = cv2.cvtColor(frames.reshape(-1, frames.shape[2], 3), cv2.COLOR_RGB2HSV).reshape(-1, 3).astype(np.int32)
    chromatic = (hsv[:, 1] >= 80) & (hsv[:, 2] >= 60)
    if not chromatic.any():
        return 0.0
    hue = hsv[chromatic, 0]
    shares = []
    for name in dict.fromkeys(names):
        distance = np.abs(hue - HUES[name])
        shares.append(float((np.minimum(distance, 180 - distance) <= tolerance).sum()) / len(hsv))
    return float(np.mean(shares))


def own_measures(frames: np.ndarray, image: np.ndarray, prompt: str) -> dict[str, float]:
    return {"frame_difference": frame_difference(frames), "first_frame_psnr": first_frame_psnr(frames, image),
            "named_hue_share": named_hue_share(frames, prompt)}


@dataclass(frozen=True)
class GuardFinding:
    """One measure of one round against round 0."""

    measure: str
    guards: str  # the reward dimension it stands beside
    before: float
    after: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float
    num_prompts: int
    fell: bool  # fell by more than the margin, significantly

    def to_dict(self) -> dict:
        return asdict(self)


def check_guard(baseline: Mapping[str, Mapping[str, float]], current: Mapping[str, Mapping[str, float]],
                reward_gain: float, margin: float, alpha: float, samples: int = 2000,
                seed: int = 0) -> tuple[bool, list[GuardFinding]]:
    """``baseline`` / ``current``: measure → prompt id → mean over the prompt's held-out seeds. Returns
    (fired, findings): fired when ``reward_gain`` > 0 and some measure fell by more than ``margin`` × |its
    round-0 mean| with p < ``alpha``."""
    findings = []
    for measure, before in baseline.items():
        after = current.get(measure, {})
        common = [k for k in before if k in after and math.isfinite(before[k]) and math.isfinite(after[k])]
        if len(common) < 2:
            continue
        c = paired_comparison({k: before[k] for k in common}, {k: after[k] for k in common}, samples=samples, seed=seed)
        base_mean = float(np.mean([before[k] for k in common]))
        fell = c.mean_diff < -margin * abs(base_mean) and c.p_value < alpha
        findings.append(GuardFinding(measure, GUARDS.get(measure, ""), base_mean, base_mean + c.mean_diff, c.mean_diff,
                                     c.ci_low, c.ci_high, c.p_value, c.num_prompts, bool(fell)))
    return reward_gain > 0 and any(f.fell for f in findings), findings
