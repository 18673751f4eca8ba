"""Released BLIP-based scorers: image-video and text-video consistency (ViT-B + heads, BERT for text)
and the character retrieval embedder (ViT-L + ``vision_proj``), on transformers' BLIP classes.

Conversion maps the released ``visual_encoder.*`` (timm-style ViT) onto ``BlipVisionModel`` with the
renames of transformers' own ``convert_blip_original_pytorch_to_hf.py``, and ``text_encoder.*``
(BLIP's ``med.py`` BERT) onto ``BlipTextModel`` (same names; the cross-attention blocks, unused in
text mode, are dropped). Scoring follows ``BLIP_Pretrain.inference``: the CLS token of every sampled
frame (post-norm ``last_hidden_state[:, 0]``, not the pooler, which would norm twice), averaged over
frames, against the key image's or the caption's CLS token, through ``head_diff`` and a sigmoid.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import nn

from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.reward.released.common import (
    CheckpointError,
    expect,
    load_pickle,
    load_strict,
    read_converted,
    released_pixels,
    write_converted,
)

CAPTION_TOKENS = 30  # the released tokenizer call: padding="max_length", truncation, max_length=30


def vit_config(state: dict, prefix: str, heads: int | None, where: str) -> dict:
    """The ViT's geometry from its tensors. Heads are not visible in a fused qkv: given, else width // 64
    (12 for the released ViT-B, 16 for ViT-L, as BLIP builds them)."""
    dim = expect(state, f"{prefix}cls_token", where=where).shape[-1]
    patch = expect(state, f"{prefix}patch_embed.proj.weight", where=where).shape[-1]
    positions = expect(state, f"{prefix}pos_embed", where=where).shape[1]
    depth = len({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))})
    mlp = expect(state, f"{prefix}blocks.0.mlp.fc1.weight", where=where).shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise CheckpointError(f"{where}: {prefix}pos_embed has {positions} positions, not a square grid + CLS")
    return {"hidden_size": dim, "intermediate_size": mlp, "num_hidden_layers": depth,
            "num_attention_heads": heads or max(1, dim // 64), "image_size": grid * patch, "patch_size": patch,
            "hidden_act": "gelu", "layer_norm_eps": 1e-6}


VIT_RENAMES = [(r"^cls_token$", "embeddings.class_embedding"), (r"^pos_embed$", "embeddings.position_embedding"),
               (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
               (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."), (r"\.attn\.qkv\.", ".self_attn.qkv."),
               (r"\.attn\.proj\.", ".self_attn.projection."), (r"^norm\.", "post_layernorm.")]


def convert_vit(state: dict, prefix: str, to: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        for pattern, repl in VIT_RENAMES:
            name = re.sub(pattern, repl, name)
        out[to + name] = value
    return out


class BlipConsistencyModel(nn.Module):
    """BlipVisionModel + ``img_proj`` / ``img_key_proj`` / ``head_diff`` (+ BlipTextModel for text-video)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        self.config = config
        self.vision = BlipVisionModel(BlipVisionConfig(**config["vision"]))
        self.text = BlipTextModel(BlipTextConfig(**config["text"]), add_pooling_layer=False) if config.get("text") else None
        width, vision_width = config["head_width"], config["vision"]["hidden_size"]
        key_width = config["text"]["hidden_size"] if self.text is not None else vision_width
        self.img_proj = nn.Linear(vision_width, width)
        self.img_key_proj = nn.Linear(key_width, width)
        self.head_diff = nn.Linear(2 * width, 1)

    def cls(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixels).last_hidden_state[:, 0]

    def forward(self, frames: list[torch.Tensor], keys: torch.Tensor | None = None, ids=None, mask=None) -> torch.Tensor:
        """``frames``: per clip [T, 3, S, S]; ``keys`` [B, 3, S, S] or caption ``ids``/``mask`` [B, L] → [B]."""
        cls = self.cls(torch.cat(frames))
        v = torch.stack([c.mean(0) for c in torch.split(cls, [len(f) for f in frames])])
        k = self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0] if ids is not None else self.cls(keys)
        return torch.sigmoid(self.head_diff(torch.cat([self.img_proj(v), self.img_key_proj(k)], dim=-1)))[:, 0]


def convert_consistency(path: str, out_dir: str, text: bool, tokenizer: str | None = None,
                        vision_heads: int | None = None, text_heads: int | None = None) -> str:
    """A released IVC (``text=False``) or TVC checkpoint (``checkpoint_0N.pth``) → a converted folder;
    TVC also needs the tokenizer folder (``weights/bert-base-uncased``), saved with BLIP's added tokens."""
    where = f"{'text' if text else 'image'}-video consistency ({path})"
    state = load_pickle(path, "model")
    vision = vit_config(state, "visual_encoder.", vision_heads, where)
    width = expect(state, "img_proj.weight", where=where).shape[0]
    config: dict = {"family": "blip_tvc" if text else "blip_ivc", "vision": vision, "head_width": width, "text": None}
    tensors = convert_vit(state, "visual_encoder.", "vision.")
    tensors |= {k: v for k, v in state.items() if k.split(".")[0] in ("img_proj", "img_key_proj", "head_diff")}
    if text:
        words = expect(state, "text_encoder.embeddings.word_embeddings.weight", where=where)
        positions = expect(state, "text_encoder.embeddings.position_embeddings.weight", where=where).shape[0]
        depth = len({int(m.group(1)) for k in state if (m := re.match(r"text_encoder\.encoder\.layer\.(\d+)\.", k))})
        hidden = expect(state, "text_encoder.encoder.layer.0.intermediate.dense.weight", where=where).shape[0]
        config["text"] = {"vocab_size": words.shape[0], "hidden_size": words.shape[1], "intermediate_size": hidden,
                          "num_hidden_layers": depth, "num_attention_heads": text_heads or max(1, words.shape[1] // 64),
                          "max_position_embeddings": positions, "layer_norm_eps": 1e-12, "is_decoder": False,
                          "encoder_hidden_size": vision["hidden_size"], "pad_token_id": 0, "bos_token_id": None,
                          "sep_token_id": None, "eos_token_id": None}
        tensors |= {"text." + k.removeprefix("text_encoder."): v for k, v in state.items()
                    if k.startswith("text_encoder.") and ".crossattention." not in k and not k.endswith("position_ids")}
    model = load_strict(BlipConsistencyModel(config), tensors, where)  # every key present, every shape right
    write_converted(out_dir, config, model.state_dict())
    if text:
        save_blip_tokenizer(tokenizer, out_dir, config["text"]["vocab_size"], where)
    return out_dir


def save_blip_tokenizer(source: str | None, out_dir: str, vocab_size: int, where: str) -> None:
    """BLIP's ``init_tokenizer``: the BERT tokenizer plus ``[DEC]`` (bos) and ``[ENC]``."""
    from transformers import BertTokenizer

    if not source:
        raise CheckpointError(f"{where}: the text-video scorer needs its BERT tokenizer folder (bert-base-uncased)")
    tok = BertTokenizer.from_pretrained(source)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) != vocab_size:
        raise CheckpointError(f"{where}: tokenizer {source} has {len(tok)} tokens with [DEC]/[ENC], the text encoder "
                              f"{vocab_size} word embeddings")
    tok.save_pretrained(f"{out_dir}/tokenizer")


class _ReleasedBlip:
    family = ""

    def __init__(self, checkpoint: str | None = None, source: str = "IndexTeam/Index-anisora", device: str = "auto",
                 dtype: str = "float32", frames: int | None = None, cache_dir: str = "~/.cache/anisora-ray"):
        from anisora_ray.models.pipeline import DTYPES, pick_device
        from anisora_ray.reward.released.convert import resolve_checkpoint

        checkpoint = resolve_checkpoint(self.name, checkpoint, source, cache_dir)
        config, tensors = read_converted(checkpoint, self.family)
        self.device, self.dtype = pick_device(device), DTYPES[dtype]
        self.model = load_strict(BlipConsistencyModel(config), tensors, checkpoint).to(self.device, self.dtype).eval()
        self.size = config["vision"]["image_size"]
        self.frames = frames  # None: every sampled frame (the released code averages all, up to 24)
        self.tokenizer = None
        if config.get("text"):
            from transformers import BertTokenizer

            self.tokenizer = BertTokenizer.from_pretrained(f"{checkpoint}/tokenizer")

    def clips(self, batch: ClipBatch) -> list[torch.Tensor]:
        from anisora_ray.reward.learned import even_indices

        picked = [c if self.frames is None else c[even_indices(len(c), min(self.frames, len(c)))] for c in batch.frames]
        return [released_pixels(c, self.size, self.device, self.dtype) for c in picked]


@register("image_video", "released")
class ReleasedImageVideo(_ReleasedBlip):
    """Released IVC: the sampled frames against the first-frame image (``checkpoint``: a converted folder)."""

    name = "image_video"
    family = "blip_ivc"

    @torch.no_grad()
    def score(self, batch: ClipBatch) -> np.ndarray:
        if not len(batch):
            return np.zeros(0)
        keys = released_pixels(batch.images, self.size, self.device, self.dtype)
        return self.model(self.clips(batch), keys=keys).float().cpu().numpy().astype(float)


@register("text_video", "released")
class ReleasedTextVideo(_ReleasedBlip):
    """Released TVC: the sampled frames against the prompt (first 28 WordPieces, as released)."""

    name = "text_video"
    family = "blip_tvc"

    @torch.no_grad()
    def score(self, batch: ClipBatch) -> np.ndarray:
        if not len(batch):
            return np.zeros(0)
        tokens = self.tokenizer(list(batch.prompts), padding="max_length", truncation=True, max_length=CAPTION_TOKENS,
                                return_tensors="pt").to(self.device)
        out = self.model(self.clips(batch), ids=tokens["input_ids"], mask=tokens["attention_mask"])
        return out.float().cpu().numpy().astype(float)


class BlipRetrievalModel(nn.Module):
    """The character recognizer: BlipVisionModel + ``vision_proj`` (no normalisation, as released)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import BlipVisionConfig, BlipVisionModel

        self.config = config
        self.vision = BlipVisionModel(BlipVisionConfig(**config["vision"]))
        self.vision_proj = nn.Linear(config["vision"]["hidden_size"], config["embed_dim"])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(self.vision(pixel_values=pixels).last_hidden_state[:, 0])


def convert_retrieval(path: str, heads: int | None = None) -> tuple[dict, BlipRetrievalModel]:
    """The released ``animate_recoginzer.pth`` → (config, model); text encoder, momentum and queue keys are ignored."""
    where = f"character recognizer ({path})"
    state = load_pickle(path, "model")
    vision = vit_config(state, "visual_encoder.", heads, where)
    embed = expect(state, "vision_proj.weight", where=where).shape[0]
    config = {"family": "blip_retrieval", "vision": vision, "embed_dim": embed}
    tensors = convert_vit(state, "visual_encoder.", "vision.")
    tensors |= {k: v for k, v in state.items() if k.startswith("vision_proj.")}
    return config, load_strict(BlipRetrievalModel(config), tensors, where)
