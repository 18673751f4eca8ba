"""Build a tiny random-init CogVideoX image-to-video pipeline from configs and save it.

Its structure mirrors ``THUDM/CogVideoX-5b-I2V`` (image latents concatenated to the noise, rotary
and learned positional embeddings, v-prediction DDIM with zero-SNR betas); only the sizes differ.
The result is a normal diffusers folder that the ``cogvideox_i2v`` family (``models/families``)
loads with ``from_pretrained`` exactly as it loads the real checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import torch

from anisora_ray.config import TinyModelConfig

# ByT5 works on UTF-8 bytes: 3 special tokens + 256 bytes + 125 extra ids; it needs no vocab file.
BYT5_VOCAB_SIZE = 384

# Scheduler settings of CogVideoX-5b-I2V.
I2V_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=1.0,
    timestep_spacing="trailing",
)


WAN_ONLY = {"wan_variant", "flow_shift", "boundary_ratio"}  # fields the tiny CogVideoX ignores (not in its cache key)
ADDED_LATER = {"warm_start_vae_images": 0, "warm_start_vae_first_frame_weight": 1.0}  # out of the key at these values
WARM_START_VERSION = 2  # bump when the warm start's data or recipe changes: cached tiny models are rebuilt


def key_fields(tiny: TinyModelConfig, exclude: set[str] = frozenset()) -> dict:
    """The tiny config as it enters a cache key: fields added later count only when set away from their
    defaults, so models cached before they existed keep their keys."""
    return {k: v for k, v in tiny.model_dump(exclude=set(exclude)).items() if ADDED_LATER.get(k, object()) != v}


def vae_temporal_factor(blocks: int) -> int:
    """CogVideoX's VAE halves time in each of its first two downsampling blocks (all but the last block)."""
    return 2 ** min(2, blocks - 1)


def tiny_fingerprint(tiny: TinyModelConfig, height: int, width: int, num_frames: int) -> str:
    import diffusers

    spec = {"tiny": key_fields(tiny, WAN_ONLY), "h": height, "w": width, "f": num_frames, "diffusers": diffusers.__version__,
            "warm_start": WARM_START_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_i2v_pipeline(tiny: TinyModelConfig, height: int, width: int, num_frames: int):
    """A random-init CogVideoXImageToVideoPipeline, deterministic for ``tiny.init_seed``."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    heads = tiny.num_attention_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.init_seed)
        text_encoder = T5EncoderModel(
            T5Config(
                vocab_size=BYT5_VOCAB_SIZE,
                d_model=tiny.text_d_model,
                d_kv=max(4, tiny.text_d_model // heads),
                d_ff=tiny.text_d_model * 2,
                num_layers=tiny.text_layers,
                num_heads=heads,
                relative_attention_num_buckets=8,
            )
        )
        blocks = tiny.vae_blocks
        vae = AutoencoderKLCogVideoX(
            down_block_types=("CogVideoXDownBlock3D",) * blocks,
            up_block_types=("CogVideoXUpBlock3D",) * blocks,
            block_out_channels=(tiny.vae_channels,) * blocks,
            latent_channels=tiny.latent_channels,
            layers_per_block=1,
            norm_num_groups=min(4, tiny.vae_channels),
            temporal_compression_ratio=vae_temporal_factor(blocks),
            sample_height=height,
            sample_width=width,
        )
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=heads,
            attention_head_dim=tiny.attention_head_dim,
            in_channels=2 * tiny.latent_channels,  # noise latents + first-frame image latents
            out_channels=tiny.latent_channels,
            time_embed_dim=tiny.time_embed_dim,
            text_embed_dim=tiny.text_d_model,
            num_layers=tiny.num_layers,
            sample_height=height // 2 ** (blocks - 1),
            sample_width=width // 2 ** (blocks - 1),
            sample_frames=num_frames,
            temporal_compression_ratio=vae_temporal_factor(blocks),
            max_text_seq_length=tiny.max_text_seq_length,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True,
        )
    for module in (text_encoder, vae, transformer):
        module.eval()  # dropout off: generation must be deterministic
    return CogVideoXImageToVideoPipeline(
        tokenizer=ByT5Tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**I2V_SCHEDULER),
    )


def save_pipeline_atomically(build, out_dir: str) -> str:
    """``build()`` a pipeline and ``save_pretrained`` it (safetensors) to ``out_dir`` unless it is there; atomic,
    so replicas never see half a model, and a second process that finishes first wins."""
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(os.path.join(out_dir, "model_index.json")):
        return out_dir
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        build().save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process finished first
            if not os.path.exists(os.path.join(out_dir, "model_index.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def save_tiny_i2v_pipeline(tiny: TinyModelConfig, height: int, width: int, num_frames: int, out_dir: str) -> str:
    """Build, warm-start when configured, and save the tiny CogVideoX pipeline to ``out_dir``."""

    def build():
        pipe = build_tiny_i2v_pipeline(tiny, height, width, num_frames)
        if tiny.warm_start_steps:
            from anisora_ray.models.families import get_family
            from anisora_ray.models.tiny_warmstart import warm_start

            warm_start(pipe, tiny, height, width, num_frames, get_family("cogvideox_i2v"))
        return pipe

    return save_pipeline_atomically(build, out_dir)
