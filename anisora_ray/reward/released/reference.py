"""The released AnimeReward modules, re-written in plain torch from bilibili/Index-anisora ``reward/``.

Each class keeps the released module and parameter names, so its ``state_dict()`` has the released
key layout, and its ``score`` follows the released inference math. Two uses: (1) build synthetic
checkpoints at any width in the released file formats (``save_released``), for tests and for
throughput runs at the released sizes; (2) be the reference that the converted transformers models
(:mod:`.blip`, :mod:`.actionclip`) must match. Nothing here is used to score in production.

Sources: ``reward/models/vit.py`` (BLIP ViT), ``reward/models/blip_pretrain.py`` and
``blip_pretrain_text.py`` (IVC / TVC heads), ``reward/models/med.py`` (BLIP's BERT, text mode),
``reward/models/actionclip.py`` + ``adapter.py`` (OpenAI CLIP + temporal adapter),
``reward/character/BLIP/blip_models/blip_pretrain.py`` (ViT + ``vision_proj``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

# ------------------------------------------------------------------ BLIP ViT (timm-style, vit.py)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12):
        super().__init__()
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed[:, : x.size(1)]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ------------------------------------------------------------------ BLIP BERT, mode='text' (med.py)


class BertSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key, self.value = nn.Linear(kv_dim or dim, dim), nn.Linear(kv_dim or dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        split = lambda t: t.view(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads) + mask
        return (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, n, c)


class BertOutput(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(dim_in, dim), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.self, self.output = BertSelfAttention(dim, heads, kv_dim), BertOutput(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.dense = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, encoder_width: int):
        super().__init__()
        self.attention = BertAttention(dim, heads)
        self.crossattention = BertAttention(dim, heads, encoder_width)  # exists (add_cross_attention), unused in text mode
        self.intermediate, self.output = BertIntermediate(dim, hidden), BertOutput(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, positions: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(self.position_ids[:, : ids.shape[1]]))


class BertEncoder(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, hidden: int, encoder_width: int):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(dim, heads, hidden, encoder_width) for _ in range(depth))


class BertModel(nn.Module):
    def __init__(self, vocab: int, dim: int = 768, depth: int = 12, heads: int = 12, hidden: int = 3072,
                 positions: int = 512, encoder_width: int = 768):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, dim, positions)
        self.encoder = BertEncoder(dim, depth, heads, hidden, encoder_width)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
        x = self.embeddings(ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


# ------------------------------------------------------------------ IVC / TVC heads (blip_pretrain*.py)


class BlipConsistency(nn.Module):
    """``BLIP_Pretrain`` of the IVC (key image) or TVC (caption, ``text_encoder``) checkpoint."""

    def __init__(self, vit: dict, text_width: int = 768, text: dict | None = None):
        super().__init__()
        self.visual_encoder = VisionTransformer(**vit)
        if text is not None:
            self.text_encoder = BertModel(**text)
        key_width = text["dim"] if text is not None else vit["dim"]
        self.img_proj = nn.Linear(vit["dim"], text_width)
        self.img_key_proj = nn.Linear(key_width, text_width)
        self.head_diff = nn.Linear(2 * text_width, 1)

    @torch.no_grad()
    def score(self, frames: torch.Tensor, key_image: torch.Tensor | None = None, ids=None, mask=None) -> torch.Tensor:
        """frames [T, 3, S, S] (one clip) → a probability. IVC: ``key_image`` [1, 3, S, S]; TVC: ``ids``/``mask`` [1, L]."""
        v = torch.stack([self.visual_encoder(f[None]) for f in frames]).mean(0)[:, 0]
        k = self.text_encoder(ids, mask)[:, 0] if ids is not None else self.visual_encoder(key_image)[:, 0]
        return torch.sigmoid(self.head_diff(torch.cat([self.img_proj(v), self.img_key_proj(k)], dim=-1)))[:, 0]


# ------------------------------------------------------------------ OpenAI CLIP + ActionCLIP adapter


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal_len: int | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.causal_len = causal_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [L, N, D] (sequence first, as in OpenAI CLIP)
        mask = None
        if self.causal_len:
            mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu_(1).to(x.dtype)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal_len: int | None = None):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal_len) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisualTransformer(nn.Module):
    def __init__(self, image_size: int, patch: int, width: int, layers: int, out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width) * width**-0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, width // 64 or 1)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out) * width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, embed: int = 512, image_size: int = 224, patch: int = 16, vision_width: int = 768,
                 vision_layers: int = 12, context: int = 77, vocab: int = 49408, text_width: int = 512,
                 text_layers: int = 12):
        super().__init__()
        self.visual = VisualTransformer(image_size, patch, vision_width, vision_layers, embed)
        self.transformer = Transformer(text_width, text_layers, text_width // 64 or 1, causal_len=context)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.randn(context, text_width) * 0.01)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed) * text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection  # EOT has the largest id


class TransformerAdapter(nn.Module):
    def __init__(self, embed: int, segments: int = 8, layers: int = 6, heads: int = 8):
        super().__init__()
        self.frame_position_embeddings = nn.Embedding(segments, embed)
        self.transformer = Transformer(embed, layers, heads)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        x = f + self.frame_position_embeddings(torch.arange(f.shape[1]))[None]
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return (x + f).mean(dim=1)  # the residual adds the features without the position embedding


class ActionClip(nn.Module):
    def __init__(self, clip: dict, segments: int = 8, adapter_layers: int = 6):
        super().__init__()
        self.clip = CLIP(**clip)
        heads = self.clip.ln_final.normalized_shape[0] // 64 or 1  # as released: the text width // 64
        self.adapter = TransformerAdapter(self.clip.text_projection.shape[1], segments, adapter_layers, heads)

    @torch.no_grad()
    def score(self, frames: torch.Tensor, prompt_ids: torch.Tensor, temperature: float = 100.0) -> torch.Tensor:
        """frames [T, 3, S, S] of one clip → probability of the first prompt (8 frames, linspace over T)."""
        idx = torch.linspace(0, frames.shape[0] - 1, steps=self.adapter.frame_position_embeddings.num_embeddings).long()
        v = self.adapter(self.clip.encode_image(frames[idx])[None])
        v = v / v.norm(dim=-1, keepdim=True)
        t = self.clip.encode_text(prompt_ids)
        t = t / t.norm(dim=-1, keepdim=True)
        return (temperature * v @ t.T).softmax(dim=-1)[0, 0]


# ------------------------------------------------------------------ character retrieval (BLIP ViT + vision_proj)


class BlipRetrieval(nn.Module):
    def __init__(self, vit: dict, embed: int = 256):
        super().__init__()
        self.visual_encoder = VisionTransformer(**vit)
        self.vision_proj = nn.Linear(vit["dim"], embed)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.vision_proj(self.visual_encoder(images)[:, 0])  # not normalised

    @torch.no_grad()
    def score(self, crops: torch.Tensor, gallery: torch.Tensor, names: list[str]) -> torch.Tensor:
        """crops [Q, 8, 3, S, S] (Q tracked objects) → per object the top-1 identity probability."""
        q = self.embed(crops.flatten(0, 1)).view(crops.shape[0], crops.shape[1], -1)
        sims = q @ gallery.T
        unique = sorted(set(names), key=names.index)
        per_name = torch.stack([sims[..., [i for i, n in enumerate(names) if n == u]].mean(-1) for u in unique], -1)
        return per_name.softmax(dim=-1).mean(dim=1).max(dim=-1).values


def save_released(model: nn.Module, path: str, container: str = "blip") -> str:
    """Write ``model``'s weights as the released files are: BLIP ``{'model': sd, 'epoch', 'config'}``,
    mmengine ``{'meta', 'state_dict'}`` (ActionCLIP)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if container == "blip":
        payload = {"model": sd, "epoch": 5, "config": {"vit": "base", "image_size": 224, "lr": 1e-5}}
    elif container == "mmengine":
        import numpy as np  # mmengine's meta carries numpy values (seeds, scalars logged by hooks)

        payload = {"meta": {"epoch": 20, "iter": 1000, "seed": np.int64(0), "best_score": np.float64(0.69),
                            "hist": np.zeros(3, np.float32), "mmengine_version": "0.10.4"}, "state_dict": sd}
    else:
        raise ValueError(f"unknown container {container!r}")
    torch.save(payload, path)
    return path
