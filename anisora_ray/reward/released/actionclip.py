"""Released visual motion: ActionCLIP (OpenAI CLIP ViT-B/16 + a temporal transformer adapter) on
transformers' ``CLIPModel``.

Conversion follows transformers' ``convert_clip_original_pytorch_to_hf.py`` (fused ``in_proj`` split
into q/k/v, ``ln_1/ln_2`` → ``layer_norm1/2``, ``c_fc/c_proj`` → ``fc1/fc2``, projections transposed);
the adapter becomes ``CLIPEncoderLayer``s (pre-LN, quick-GELU, no mask) plus its frame embeddings.
Scoring is the released one: 8 frames spread over the sampled clip, CLIP image features (not
normalised) + frame position → adapter → + the features again → mean over frames → normalised,
against the two motion prompts' normalised text features, softmax of 100 × cosine; the score is
the probability of the "large movement" prompt.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from torch import nn

from anisora_ray.reward.base import ClipBatch, register
from anisora_ray.reward.learned import MOTION_PROMPTS
from anisora_ray.reward.released.common import (
    CheckpointError,
    expect,
    load_pickle,
    load_strict,
    read_converted,
    released_pixels,
    write_converted,
)

FAMILY = "actionclip"
BLOCK_RENAMES = [(r"\.attn\.out_proj\.", ".self_attn.out_proj."), (r"\.ln_1\.", ".layer_norm1."),
                 (r"\.ln_2\.", ".layer_norm2."), (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2.")]


def _layers(state: dict, prefix: str) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))})


def _blocks(state: dict, src: str, dst: str) -> dict[str, torch.Tensor]:
    """OpenAI ``ResidualAttentionBlock``s under ``src`` → ``CLIPEncoderLayer``s under ``dst``."""
    out = {}
    for key, value in state.items():
        if not key.startswith(src):
            continue
        name = dst + key[len(src):]
        if ".attn.in_proj_" in name:
            kind = name.rsplit("_", 1)[-1]  # weight | bias
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                out[name.replace(f".attn.in_proj_{kind}", f".self_attn.{part}_proj.{kind}")] = chunk
            continue
        for pattern, repl in BLOCK_RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = value
    return out


class ActionClipModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        from transformers import CLIPConfig, CLIPModel, CLIPTextConfig
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        self.config = config
        self.clip = CLIPModel(CLIPConfig(text_config=config["text"], vision_config=config["vision"],
                                         projection_dim=config["embed"]))
        a = config["adapter"]
        layer_config = CLIPTextConfig(hidden_size=config["embed"], intermediate_size=4 * config["embed"],
                                      num_attention_heads=a["heads"], hidden_act="quick_gelu", layer_norm_eps=1e-5)
        layer_config._attn_implementation = "eager"
        self.frame_position_embeddings = nn.Embedding(a["segments"], config["embed"])
        self.adapter = nn.ModuleList(CLIPEncoderLayer(layer_config) for _ in range(a["layers"]))

    def video(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, S, S] (T = segments) → normalised video features [B, E]."""
        b, t = frames.shape[:2]
        f = self.clip.get_image_features(pixel_values=frames.flatten(0, 1))
        f = (f if torch.is_tensor(f) else f.pooler_output).view(b, t, -1)
        x = f + self.frame_position_embeddings(torch.arange(t, device=f.device))[None]
        for layer in self.adapter:
            x = layer(x, None)
            x = x[0] if isinstance(x, tuple) else x
        v = (x + f).mean(dim=1)
        return v / v.norm(dim=-1, keepdim=True)

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = self.clip.get_text_features(input_ids=ids, attention_mask=mask)
        t = t if torch.is_tensor(t) else t.pooler_output
        return t / t.norm(dim=-1, keepdim=True)


def convert_actionclip(path: str, out_dir: str, tokenizer: str = "openai/clip-vit-base-patch16") -> str:
    """The released ``testvl-*.pth`` (mmengine, ``state_dict``) → a converted folder with the CLIP tokenizer."""
    from transformers import AutoTokenizer

    where = f"visual motion ({path})"
    state = load_pickle(path, "state_dict")
    conv = expect(state, "clip.visual.conv1.weight", where=where)
    width, patch = conv.shape[0], conv.shape[-1]
    positions = expect(state, "clip.visual.positional_embedding", where=where).shape[0]
    grid = math.isqrt(positions - 1)
    embed = expect(state, "clip.visual.proj", where=where).shape[1]
    text_width = expect(state, "clip.ln_final.weight", where=where).shape[0]
    vocab, _ = expect(state, "clip.token_embedding.weight", where=where).shape
    context = expect(state, "clip.positional_embedding", where=where).shape[0]
    segments = expect(state, "adapter.frame_position_embeddings.weight", where=where).shape[0]
    tok = AutoTokenizer.from_pretrained(tokenizer)
    if len(tok) > vocab:
        raise CheckpointError(f"{where}: tokenizer {tokenizer} has {len(tok)} tokens, the text tower {vocab}")
    config = {
        "family": FAMILY, "embed": embed,
        "vision": {"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": _layers(
            state, "clip.visual.transformer.resblocks."), "num_attention_heads": max(1, width // 64),
            "image_size": grid * patch, "patch_size": patch, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
        "text": {"hidden_size": text_width, "intermediate_size": 4 * text_width, "num_hidden_layers": _layers(
            state, "clip.transformer.resblocks."), "num_attention_heads": max(1, text_width // 64), "vocab_size": vocab,
            "max_position_embeddings": context, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        "adapter": {"segments": segments, "layers": _layers(state, "adapter.transformer.resblocks."),
                    "heads": max(1, text_width // 64)},  # as released: the text width // 64
    }
    v, t = "clip.vision_model.", "clip.text_model."
    tensors = {
        v + "embeddings.patch_embedding.weight": conv,
        v + "embeddings.class_embedding": expect(state, "clip.visual.class_embedding", where=where),
        v + "embeddings.position_embedding.weight": state["clip.visual.positional_embedding"],
        "clip.visual_projection.weight": state["clip.visual.proj"].T,
        t + "embeddings.token_embedding.weight": state["clip.token_embedding.weight"],
        t + "embeddings.position_embedding.weight": state["clip.positional_embedding"],
        "clip.text_projection.weight": expect(state, "clip.text_projection", where=where).T,
        "clip.logit_scale": expect(state, "clip.logit_scale", where=where),
        "frame_position_embeddings.weight": state["adapter.frame_position_embeddings.weight"],
    }
    for src, dst in [("clip.visual.ln_pre.", v + "pre_layrnorm."), ("clip.visual.ln_post.", v + "post_layernorm."),
                     ("clip.ln_final.", t + "final_layer_norm.")]:
        for kind in ("weight", "bias"):
            tensors[dst + kind] = expect(state, src + kind, where=where)
    tensors |= _blocks(state, "clip.visual.transformer.resblocks.", v + "encoder.layers.")
    tensors |= _blocks(state, "clip.transformer.resblocks.", t + "encoder.layers.")
    tensors |= _blocks(state, "adapter.transformer.resblocks.", "adapter.")
    model = load_strict(ActionClipModel(config), tensors, where)
    write_converted(out_dir, config, model.state_dict())
    tok.save_pretrained(f"{out_dir}/tokenizer")
    return out_dir


@register("visual_motion", "released")
class ReleasedMotion:
    """Released ActionCLIP motion (``checkpoint``: a folder written by ``anisora-ray convert-reward``)."""

    name = "visual_motion"

    def __init__(self, checkpoint: str | None = None, source: str = "IndexTeam/Index-anisora",
                 prompts: list[str] | tuple[str, ...] = MOTION_PROMPTS, temperature: float = 100.0, device: str = "auto",
                 dtype: str = "float32", cache_dir: str = "~/.cache/anisora-ray",
                 clip_tokenizer: str = "openai/clip-vit-base-patch16"):
        from transformers import AutoTokenizer

        from anisora_ray.models.pipeline import DTYPES, pick_device
        from anisora_ray.reward.released.convert import resolve_checkpoint

        checkpoint = resolve_checkpoint(self.name, checkpoint, source, cache_dir, clip_tokenizer)
        config, tensors = read_converted(checkpoint, FAMILY)
        self.device, self.dtype = pick_device(device), DTYPES[dtype]
        self.model = load_strict(ActionClipModel(config), tensors, checkpoint).to(self.device, self.dtype).eval()
        self.size, self.segments = config["vision"]["image_size"], config["adapter"]["segments"]
        self.temperature = float(temperature)
        tok = AutoTokenizer.from_pretrained(f"{checkpoint}/tokenizer")
        ids = tok(list(prompts), padding=True, truncation=True, max_length=config["text"]["max_position_embeddings"],
                  return_tensors="pt").to(self.device)
        with torch.no_grad():
            self.prompt_features = self.model.text(ids["input_ids"], ids["attention_mask"])

    @torch.no_grad()
    def score(self, batch: ClipBatch) -> np.ndarray:
        if not len(batch):
            return np.zeros(0)
        picked = [c[torch.linspace(0, len(c) - 1, steps=self.segments).long().numpy()] for c in batch.frames]
        pixels = torch.stack([released_pixels(c, self.size, self.device, self.dtype) for c in picked])
        video = self.model.video(pixels)
        probs = (self.temperature * video.float() @ self.prompt_features.float().T).softmax(dim=-1)
        return probs[:, 0].cpu().numpy().astype(float)
