"""Random-init models for ``gpu_round.py``: the Mantis-Idefics2-8B regression scorer at its released size (the
other released scorers come from ``anisora_ray.reward.released.synthetic`` at ``size="released"``, the generator
from ``realsize_gpu.build_realsize``), and the tiny geometry of the CPU twin."""

from __future__ import annotations

import os

# The CPU twin: the tiny generator built from configs/local.yaml's sizes, at the suite's geometry.
TINY_GEOMETRY = ["model.pretrained=tiny", "model.dtype=float32", "model.tiny.warm_start_steps=0", "generator.height=32",
                 "generator.width=32", "generator.num_frames=9", "generator.max_sequence_length=128",
                 "generator.vae_tiling=false", "generator.vae_slicing=false", "video.sample_size=32"]

# Mantis-8B-Idefics2 (idefics2-8b): SigLIP-so400m vision tower at 980 px, perceiver resampler, Mistral-7B text
# model (/work/shared/design/animereward-released.md section 2, from the released configs).
VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=980,
              patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PERCEIVER = dict(hidden_act="silu", resampler_n_latents=64, resampler_depth=3, resampler_n_heads=16,
                 resampler_head_dim=96, num_key_value_heads=4)
TEXT = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=32003, rms_norm_eps=1e-5, pad_token_id=0, tie_word_embeddings=False)


def idefics2_8b(path: str, seed: int = 0) -> str:
    """An 8B Mantis-Idefics2 regression folder (bf16 safetensors, processor as trained) with random weights,
    initialized on the GPU when there is one."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Idefics2Config, Idefics2ImageProcessor, Idefics2Processor, PreTrainedTokenizerFast

    from anisora_ray.reward.released.idefics2 import REGRESSION_QUERY_PROMPT, _regression_class

    words = sorted(set(REGRESSION_QUERY_PROMPT.replace("{text_prompt}", "").split()) | {"a", "girl", "boy", "waves"})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    images = Idefics2ImageProcessor(do_image_splitting=False, size={"shortest_edge": 378, "longest_edge": 980})
    Idefics2Processor(images, tokenizer, image_seq_len=64).save_pretrained(path)
    config = Idefics2Config(vision_config=VISION, perceiver_config=PERCEIVER, text_config=TEXT, num_labels=1,
                            problem_type="regression", image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = _regression_class()(config).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return os.path.abspath(path)
