"""Build a tiny random-init Wan image-to-video pipeline from configs and save it (the ``wan_i2v`` family).

``model.tiny.wan_variant`` mirrors one of the three released structures, sizes aside:

- ``wan21_i2v`` – Wan2.1-I2V-14B (AniSora V2): a CLIP vision encoder's penultimate hidden states as image
  tokens (``image_dim``, ``added_kv_proj_dim``), and the condition [mask; VAE latents of the image followed by
  zero frames] concatenated to the noise on channels (in_channels = 2·z + the VAE's temporal factor);
- ``wan22_ti2v`` – Wan2.2-TI2V-5B: ``expand_timesteps``: the first latent frame *is* the image's latents,
  its tokens get timestep 0; in_channels = z;
- ``wan22_i2v_a14b`` – Wan2.2-I2V-A14B (AniSora V3): the Wan2.1 condition without the CLIP encoder, two
  experts (``transformer`` for t ≥ ``boundary_ratio``·N, ``transformer_2`` below).

A UMT5 encoder with a byte-level (ByT5) tokenizer stands in for UMT5-XXL (no vocab file); the scheduler is
UniPC with flow sigmas and ``flow_shift``, as the Diffusers checkpoints ship it. The folder is a normal
diffusers folder: ``WanImageToVideoPipeline.from_pretrained`` loads it as it loads the real checkpoints.
"""

from __future__ import annotations

import hashlib
import json

import torch

from anisora_ray.config import TinyModelConfig
from anisora_ray.models.tiny import BYT5_VOCAB_SIZE, key_fields, save_pipeline_atomically, vae_temporal_factor

CLIP_IMAGE_SIZE = 32  # the tiny CLIP's input (224 in Wan2.1's ViT-H/14)
WAN_WARM_START_VERSION = 3  # 3: the denoiser phase encodes its clips in one VAE call (other bits than 2)


def tiny_wan_fingerprint(tiny: TinyModelConfig, height: int, width: int, num_frames: int) -> str:
    import diffusers

    spec = {"family": "wan_i2v", "tiny": key_fields(tiny), "h": height, "w": width, "f": num_frames,
            "diffusers": diffusers.__version__, "warm_start": WAN_WARM_START_VERSION}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_tiny_wan_pipeline(tiny: TinyModelConfig):
    """A random-init WanImageToVideoPipeline of ``tiny.wan_variant``, deterministic for ``tiny.init_seed``."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import ByT5Tokenizer, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    variant, heads, z = tiny.wan_variant, tiny.num_attention_heads, tiny.latent_channels
    blocks = tiny.vae_blocks
    temporal = vae_temporal_factor(blocks)
    inner = heads * tiny.attention_head_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.init_seed)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=BYT5_VOCAB_SIZE, d_model=tiny.text_d_model, d_kv=max(4, tiny.text_d_model // heads),
            d_ff=tiny.text_d_model * 2, num_layers=tiny.text_layers, num_heads=heads,
            relative_attention_num_buckets=8))
        vae = AutoencoderKLWan(
            base_dim=tiny.vae_channels, z_dim=z, dim_mult=[1] * blocks, num_res_blocks=1, attn_scales=[],
            temperal_downsample=[i < 2 for i in range(blocks - 1)], latents_mean=[0.0] * z, latents_std=[1.0] * z,
            scale_factor_temporal=temporal, scale_factor_spatial=2 ** (blocks - 1))
        image_encoder = image_processor = None
        if variant == "wan21_i2v":
            vision = CLIPVisionConfig(hidden_size=tiny.text_d_model, intermediate_size=tiny.text_d_model * 2,
                                      num_hidden_layers=2, num_attention_heads=heads, image_size=CLIP_IMAGE_SIZE,
                                      patch_size=8)
            image_encoder = CLIPVisionModel(vision)
            image_processor = CLIPImageProcessorPil(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                                    crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})

        def transformer():
            return WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=tiny.attention_head_dim,
                in_channels=z if variant == "wan22_ti2v" else 2 * z + temporal, out_channels=z,
                text_dim=tiny.text_d_model, freq_dim=tiny.time_embed_dim, ffn_dim=inner * 2,
                num_layers=tiny.num_layers, image_dim=tiny.text_d_model if image_encoder is not None else None,
                added_kv_proj_dim=inner if image_encoder is not None else None, rope_max_seq_len=64)

        first = transformer()
        second = transformer() if variant == "wan22_i2v_a14b" else None
    for module in (text_encoder, vae, first, second, image_encoder):
        if module is not None:
            module.eval()
    return WanImageToVideoPipeline(
        tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=tiny.flow_shift, num_train_timesteps=1000),
        image_processor=image_processor, image_encoder=image_encoder, transformer=first, transformer_2=second,
        boundary_ratio=tiny.boundary_ratio if second is not None else None,
        expand_timesteps=variant == "wan22_ti2v")


def save_tiny_wan_pipeline(tiny: TinyModelConfig, height: int, width: int, num_frames: int, out_dir: str) -> str:
    """Build, warm-start when configured, ``save_pretrained`` (safetensors) to ``out_dir``, atomically."""

    def build():
        pipe = build_tiny_wan_pipeline(tiny)
        if tiny.warm_start_steps:
            from anisora_ray.models.families import get_family
            from anisora_ray.models.tiny_warmstart import warm_start

            warm_start(pipe, tiny, height, width, num_frames, get_family("wan_i2v"))
        return pipe

    return save_pipeline_atomically(build, out_dir)
