"""VBench-I2V-style video metrics, independent of AnimeReward: what ``anisora-ray eval`` reports beside it.

Per video (higher is better, each in [0, 1]):

- ``subject_consistency`` (VBench-I2V ``i2v_subject``): 0.5 · max over frames of cos(input image,
  frame) + 0.5 · mean over consecutive frames of cos(frame t−1, frame t), cosines clipped at 0.
  Learned form: DINO(v2) pooled features (``subject_backbone``); weight-free form: mean-centred
  16×16 colour thumbnails.
- ``dynamic_degree`` (VBench): 1 if at least round(4 · frames/16) consecutive-frame pairs move more
  than 6 px at a 256-px side (scaled to the video, ×max(1, 8/fps)), the motion of a pair being the mean
  of its top 5% optical-flow magnitudes; 0 otherwise. The model's score is the share of moving videos.
  Flow: OpenCV Farneback (VBench uses RAFT).
- ``motion_smoothness`` (VBench): 1 − mean |odd frame − its interpolation from the even frames| / 255.
  Interpolation: linear (VBench uses the learned AMT interpolator).
- ``aesthetic_quality`` (VBench): mean over frames of the LAION aesthetic predictor (a linear head on
  L2-normalized CLIP ViT-L/14 image features) / 10 (``aesthetic_backbone`` + ``aesthetic_head``);
  weight-free form: colourfulness, contrast and sharpness (the classical ``visual_appeal``).
"""

from __future__ import annotations

import logging
import math
import os

import cv2
import numpy as np

from anisora_ray.config.sections import VideoMetricsConfig
from anisora_ray.errors import ConfigError
from anisora_ray.eval.guard import OWN_MEASURES, own_measures

log = logging.getLogger(__name__)

METRICS = ("subject_consistency", "dynamic_degree", "motion_smoothness", "aesthetic_quality")
MEASURES = (*METRICS, *OWN_MEASURES)  # with the guard's own measures (eval/guard.py): what score_videos adds


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return max(0.0, float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))


def subject_consistency(image_features: np.ndarray, frame_features: np.ndarray) -> float:
    """VBench-I2V's weighting of conformity to the input image and consistency between frames."""
    conformity = [_cos(image_features, f) for f in frame_features]
    consecutive = [_cos(a, b) for a, b in zip(frame_features[:-1], frame_features[1:], strict=True)]
    return 0.5 * max(conformity) + 0.5 * (float(np.mean(consecutive)) if consecutive else 1.0)


def thumbnail_features(frames: np.ndarray) -> np.ndarray:
    """Weight-free per-frame features: 16×16 RGB thumbnails, mean-centred per frame."""
    thumbs = np.stack([cv2.resize(f, (16, 16), interpolation=cv2.INTER_AREA) for f in frames]).astype(np.float32)
    flat = thumbs.reshape(len(frames), -1)
    return flat - flat.mean(axis=1, keepdims=True)


def dynamic_degree(frames: np.ndarray, fps: float) -> float:
    """1.0 when the video moves by VBench's rule (see the module docstring), else 0.0."""
    if len(frames) < 2:
        return math.nan
    scale = min(frames.shape[1:3])
    threshold = max(1.0, 8.0 / fps) * 6.0 * scale / 256.0
    needed = max(1, round(4 * len(frames) / 16.0))
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    moving = 0
    for a, b in zip(gray[:-1], gray[1:], strict=True):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)
        magnitude = np.sort(np.linalg.norm(flow, axis=-1).ravel())[::-1]
        top = magnitude[: max(1, int(magnitude.size * 0.05))]
        moving += int(top.mean() > threshold)
    return float(moving >= needed)


def motion_smoothness(frames: np.ndarray) -> float:
    """1 − the mean absolute error of the odd frames linearly interpolated from their even neighbours."""
    even = frames[0::2].astype(np.float32)
    if len(even) < 2:
        return math.nan
    odd = frames[1::2][: len(even) - 1].astype(np.float32)
    predicted = (even[:-1] + even[1:]) / 2.0
    return float(1.0 - np.abs(predicted - odd).mean() / 255.0)


def check_metrics_config(cfg: VideoMetricsConfig) -> None:
    """What can be checked without loading a model: the two aesthetic keys together, a local head file present."""
    if bool(cfg.aesthetic_backbone) != bool(cfg.aesthetic_head):
        raise ConfigError("eval.metrics: aesthetic_backbone and aesthetic_head go together (the LAION predictor is "
                          "a linear head on CLIP ViT-L/14 features); set both or neither")
    if cfg.aesthetic_head and not os.path.isfile(os.path.expanduser(cfg.aesthetic_head)):
        raise ConfigError(f"eval.metrics.aesthetic_head {cfg.aesthetic_head!r} does not exist: the LAION aesthetic "
                          "predictor's linear head (sa_0_4_vit_l_14_linear.pth of github.com/LAION-AI/aesthetic-"
                          "predictor, as VBench loads it) on storage every node sees; or unset aesthetic_backbone and "
                          "aesthetic_head for the weight-free form (the guard then only warns on it)")


def load_linear_head(path: str):
    """The LAION predictor's ``nn.Linear(D, 1)`` (``weight``/``bias``) from safetensors, or a .pth with weights_only."""
    import torch

    if not os.path.isfile(path):
        raise ConfigError(f"eval.metrics.aesthetic_head {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2 or state["weight"].shape[0] != 1:
        raise ConfigError(f"eval.metrics.aesthetic_head {path!r}: expected a linear head (weight [1, D], bias [1]), "
                          f"got {{{', '.join(f'{k}: {list(v.shape)}' for k, v in state.items())}}}")
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head.eval()


class VideoMetrics:
    """Scores videos on :data:`MEASURES`; learned models are loaded once, where the config names them."""

    def __init__(self, cfg: VideoMetricsConfig):
        import torch

        from anisora_ray.models.pipeline import pick_device
        from anisora_ray.models.tiny_reward import resolve_backbone

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        self.subject = None
        if cfg.subject_backbone:
            from transformers import AutoImageProcessor, AutoModel

            path = resolve_backbone(cfg.subject_backbone, cfg.cache_dir)
            self.subject = AutoModel.from_pretrained(path, use_safetensors=True).eval().requires_grad_(False).to(self.device)
            processor = AutoImageProcessor.from_pretrained(path)
            crop = getattr(processor, "crop_size", None) or {"height": self.subject.config.image_size}
            self._subject_size = int(crop["height"])
            self._subject_mean = torch.tensor(processor.image_mean, device=self.device).view(1, 3, 1, 1)
            self._subject_std = torch.tensor(processor.image_std, device=self.device).view(1, 3, 1, 1)
        self.clip = self.head = None
        check_metrics_config(cfg)
        if cfg.aesthetic_backbone:
            from anisora_ray.reward.encoders import Backbone

            self.clip = Backbone(cfg.aesthetic_backbone, device=cfg.device, cache_dir=cfg.cache_dir, text=False)
            self.head = load_linear_head(os.path.expanduser(cfg.aesthetic_head)).to(self.clip.device)

    def _frames_for_models(self, frames: np.ndarray) -> np.ndarray:
        picks = np.linspace(0, len(frames) - 1, min(self.cfg.max_frames, len(frames))).round().astype(int)
        return frames[picks]

    def _subject_features(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = torch.nn.functional.interpolate(x, size=(self._subject_size, self._subject_size), mode="bicubic",
                                            antialias=True, align_corners=False).clamp(0, 1)
        with torch.no_grad():
            out = self.subject(pixel_values=(x - self._subject_mean) / self._subject_std)
        return out.pooler_output.float().cpu().numpy()

    def score(self, frames: np.ndarray, image: np.ndarray, fps: float, prompt: str = "") -> dict[str, float]:
        """``frames``: uint8 [T, H, W, 3]; ``image``: the uint8 [H, W, 3] first-frame condition. Returns
        :data:`MEASURES` (the guard's own measures too)."""
        import torch

        if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 3:
            raise ValueError(f"expected uint8 frames [T>=3, H, W, 3], got shape {tuple(frames.shape)}")
        picked = self._frames_for_models(frames)
        image = cv2.resize(image, (frames.shape[2], frames.shape[1]), interpolation=cv2.INTER_AREA)  # the video's size
        if self.subject is not None:
            feats = self._subject_features(np.concatenate([image[None], picked]))
        else:
            feats = thumbnail_features(np.concatenate([image[None], frames]))
        out = {**own_measures(frames, image, prompt), "subject_consistency": subject_consistency(feats[0], feats[1:]),
               "dynamic_degree": dynamic_degree(frames, fps), "motion_smoothness": motion_smoothness(frames)}
        if self.clip is not None:
            with torch.no_grad():
                embeds = torch.nn.functional.normalize(self.clip.image_features(picked), dim=-1)
                out["aesthetic_quality"] = float(self.head(embeds.to(self.head.weight.dtype)).mean()) / 10.0
        else:
            from anisora_ray.reward.classical import ColourContrastSharpness

            out["aesthetic_quality"] = ColourContrastSharpness().clip_appeal(frames)  # the classical visual_appeal
        return out


class VideoMetricsUDF:
    """Ray Data batch UDF: rows with ``video_uri``, ``image_uri``, ``fps`` → the metrics, or a quarantine reason."""

    def __init__(self, cfg: VideoMetricsConfig):
        self.metrics = VideoMetrics(cfg)

    def __call__(self, batch: dict) -> dict:
        from anisora_ray.io.images import load_image
        from anisora_ray.io.video import read_all_frames

        n = len(batch["video_uri"])
        out = {name: np.full(n, np.nan) for name in MEASURES}
        reasons = [""] * n
        for i in range(n):
            try:
                frames = read_all_frames(str(batch["video_uri"][i]))
                image = np.asarray(load_image(str(batch["image_uri"][i])).convert("RGB"))
                prompt = str(batch["prompt"][i]) if "prompt" in batch else ""
                for name, value in self.metrics.score(frames, image, float(batch["fps"][i]), prompt).items():
                    out[name][i] = value
            except Exception as exc:  # one unreadable video is quarantined, the rest go on
                reasons[i] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return {**batch, **out, "metrics_error": np.array(reasons, dtype=object)}


def score_videos(rows: list[dict], cfg: VideoMetricsConfig) -> list[dict]:
    """Each row (``video_uri``, ``image_uri``, ``fps``, ``prompt``; other keys kept) with :data:`MEASURES` added,
    computed by ``cfg.concurrency`` Ray Data actors; a row whose video cannot be read keeps NaNs and a
    ``metrics_error``."""
    import ray

    if not rows:
        return []
    keep = [{k: r.get(k, "") for k in ("prompt_id", "seed", "video_uri", "image_uri", "fps", "prompt")} for r in rows]
    resources = {"num_cpus": cfg.num_cpus, **({"num_gpus": cfg.num_gpus} if cfg.num_gpus else {})}
    ds = ray.data.from_items(keep).map_batches(VideoMetricsUDF, fn_constructor_args=(cfg,), batch_size=8,
                                               compute=ray.data.ActorPoolStrategy(size=cfg.concurrency), **resources)
    scored = {(r["prompt_id"], int(r["seed"])): r for r in ds.take_all()}
    return [{**r, **{k: float(scored[(r["prompt_id"], int(r["seed"]))][k]) for k in MEASURES},
             "metrics_error": str(scored[(r["prompt_id"], int(r["seed"]))]["metrics_error"] or "")} for r in rows]


METRICS_FILE = "video-metrics.parquet"  # beside an eval folder's scores.parquet
FORMS_FILE = "video-metrics.forms.json"  # the forms (metric_forms) it was computed in


def ensure_video_metrics(eval_dir: str, cfg: VideoMetricsConfig, regenerate: bool = False) -> str:
    """``<eval_dir>/video-metrics.parquet``: :data:`MEASURES` of every scored (not quarantined) candidate of
    ``scores.parquet``, computed once, and again with ``regenerate`` or when the forms it was computed in
    (``video-metrics.forms.json`` beside it: DINO or thumbnails, the LAION head or not) are not ``cfg``'s; returns
    its URI."""
    import json

    import pyarrow as pa

    from anisora_ray.io import fs

    uri, forms_uri, forms = fs.join(eval_dir, METRICS_FILE), fs.join(eval_dir, FORMS_FILE), metric_forms(cfg)
    current = metrics_current(eval_dir, cfg)
    if fs.exists(uri) and not current:
        log.info("%s: computed in other forms than this config's; computing it again", uri)
    if regenerate or not current:
        rows = [r for r in fs.read_table(fs.join(eval_dir, "scores.parquet")).to_pylist() if not r.get("quarantine_reason")]
        fs.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt_id", "seed", "metrics_error", *MEASURES)}
                                             for r in score_videos(rows, cfg)]), uri)
        fs.write_bytes(forms_uri, json.dumps(forms, sort_keys=True).encode())
    return uri


def metrics_current(eval_dir: str, cfg: VideoMetricsConfig) -> bool:
    """Whether ``eval_dir`` holds video metrics in ``cfg``'s forms (a file without its forms record counts)."""
    import json

    from anisora_ray.io import fs

    forms_uri = fs.join(eval_dir, FORMS_FILE)
    return fs.exists(fs.join(eval_dir, METRICS_FILE)) and (
        not fs.exists(forms_uri) or json.loads(fs.read_bytes(forms_uri)) == metric_forms(cfg))


def metric_forms(cfg: VideoMetricsConfig) -> dict[str, str]:
    """Which form of each metric ``cfg`` selects (without loading anything)."""
    return {"subject_consistency": f"DINO features ({cfg.subject_backbone})" if cfg.subject_backbone else "pixel thumbnails",
            "dynamic_degree": "Farneback flow (VBench: RAFT)",
            "motion_smoothness": "linear interpolation (VBench: AMT)",
            "aesthetic_quality": f"LAION head on {cfg.aesthetic_backbone}" if cfg.aesthetic_head else "classical appeal",
            "frame_difference": "guard: mean abs consecutive-frame difference",
            "first_frame_psnr": "guard: first frame vs input image, dB",
            "named_hue_share": "guard: HSV hue share of the named colour"}
