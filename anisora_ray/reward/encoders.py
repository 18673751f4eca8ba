"""Frozen transformers backbones and small regression heads, the parts the learned backends share.

A :class:`Backbone` loads any CLIP-family model (CLIP, SigLIP, X-CLIP, BLIP, ...) with
``AutoModel.from_pretrained`` (safetensors only) plus its tokenizer and image-processor statistics,
and turns uint8 frames into pooled, projected features. A :class:`RegressionHead` is an MLP
saved as ``head.safetensors`` + ``head.json``; ``anisora-ray train-reward`` fits it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from torch import nn

from anisora_ray.io import fs
from anisora_ray.models.pipeline import DTYPES, pick_device
from anisora_ray.models.tiny_reward import resolve_backbone

HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head.json"


def pooled(output: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from ``get_*_features``; older versions a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


class Backbone:
    """One frozen vision(-language) model on one device, with its preprocessing."""

    def __init__(self, spec: str, *, device: str = "auto", dtype: str = "float32", revision: str | None = None,
                 cache_dir: str = "~/.cache/anisora-ray", max_images: int = 256, text: bool = True,
                 adapter: str | None = None):
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.spec, self.path = spec, resolve_backbone(spec, cache_dir)
        self.device, self.dtype = pick_device(device), DTYPES[dtype]
        self.model = AutoModel.from_pretrained(self.path, revision=revision, dtype=self.dtype, use_safetensors=True)
        if adapter:  # LoRA weights fitted by `anisora-ray train-reward`
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, revision=revision) if text else None
        processor = AutoImageProcessor.from_pretrained(self.path, revision=revision)
        vision = getattr(self.model.config, "vision_config", self.model.config)
        self.image_size = int(vision.image_size)
        self.num_frames = int(getattr(vision, "num_frames", 0) or 0)  # X-CLIP's temporal size
        self._mean = torch.tensor(processor.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(processor.image_std, device=self.device).view(1, 3, 1, 1)
        self.max_images = max_images

    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] → normalized [N, 3, S, S] at the model's resolution (square resize, as released)."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                                          antialias=True, align_corners=False).clamp(0, 1)
        return ((x - self._mean) / self._std).to(self.dtype)

    def image_features(self, frames: np.ndarray) -> torch.Tensor:
        """Projected image features, float32 [N, D], computed in chunks of ``max_images``."""
        out = []
        for i in range(0, len(frames), self.max_images):
            out.append(pooled(self.model.get_image_features(pixel_values=self.pixels(frames[i : i + self.max_images]))))
        return torch.cat(out).float()

    def video_features(self, clips: list[np.ndarray]) -> torch.Tensor:
        """X-CLIP video features, float32 [B, D]; every clip must have ``num_frames`` frames."""
        pix = torch.stack([self.pixels(c) for c in clips])
        return pooled(self.model.get_video_features(pixel_values=pix)).float()

    def text_features(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError(f"backbone {self.spec!r} was loaded without its text tower")
        limit = int(getattr(getattr(self.model.config, "text_config", None), "max_position_embeddings", 77))
        padding = "max_length" if self.model.config.model_type.startswith("siglip") else True
        tokens = self.tokenizer(list(texts), padding=padding, truncation=True, max_length=min(limit, 77),
                                return_tensors="pt").to(self.device)
        return pooled(self.model.get_text_features(**tokens)).float()


def l2(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x, dim=-1)


class RegressionHead(nn.Module):
    """MLP from a token feature to a score; a clip's score is the mean over its tokens.

    Trained on standardized labels; ``output="identity"`` maps back to label units,
    ``output="sigmoid"`` squashes to (0, 1) (same order).
    """

    def __init__(self, in_features: int, hidden: int = 256, output: str = "identity",
                 label_mean: float = 0.0, label_std: float = 1.0, meta: dict | None = None):
        super().__init__()
        if output not in ("identity", "sigmoid"):
            raise ValueError(f"head output must be 'identity' or 'sigmoid', got {output!r}")
        self.config = dict(in_features=in_features, hidden=hidden, output=output,
                           label_mean=float(label_mean), label_std=float(label_std), meta=meta or {})
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, standardized: bool = False) -> torch.Tensor:
        """[..., K, D] → [...]: the mean over the (unmasked) tokens of the MLP output."""
        z = self.mlp(tokens).squeeze(-1)
        z = z.mean(-1) if mask is None else (z * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        if standardized:
            return z
        if self.config["output"] == "sigmoid":
            return torch.sigmoid(z)
        return z * self.config["label_std"] + self.config["label_mean"]

    def save(self, path: str) -> str:
        """Write ``head.safetensors`` and ``head.json`` under ``path`` (a folder or any fsspec URL)."""
        from safetensors.torch import save

        fs.write_bytes(fs.join(path, HEAD_WEIGHTS), save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}))
        fs.write_bytes(fs.join(path, HEAD_CONFIG), json.dumps(self.config, indent=2, sort_keys=True).encode())
        return path

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> RegressionHead:
        from safetensors.torch import load

        try:
            config = json.loads(fs.read_bytes(fs.join(path, HEAD_CONFIG)))
            state = load(fs.read_bytes(fs.join(path, HEAD_WEIGHTS)))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"reward head {path!r} is missing {os.path.basename(str(exc.filename or exc))}; "
                                    "train one with `anisora-ray train-reward`") from None
        head = cls(**config)
        head.load_state_dict(state)
        return head.to(device).eval()
