"""Tiny random-init reward backbones (CLIP, SigLIP, X-CLIP, GroundingDINO, SAM) built from configs.

Each is saved as a normal transformers folder (weights as safetensors, tokenizer, image processor)
so the reward backends load it with the same ``from_pretrained`` calls as the real checkpoints
(``openai/clip-vit-large-patch14``, ``google/siglip-so400m-patch14-384``, ``microsoft/xclip-base-patch32``,
``IDEA-Research/grounding-dino-tiny``, ``facebook/sam-vit-base``). A backbone spec ``tiny:<kind>``
in a reward option resolves to such a folder, built once and cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

TINY_KINDS = ("clip", "siglip", "xclip", "grounding-dino", "sam", "dinov2")
TINY_IMAGE_SIZE = 32
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=TINY_IMAGE_SIZE, patch_size=8)
_BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "character", "a", "the", "person"]


def _byt5_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def _clip(base: bool):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if base:  # ViT-B/32 at 224, the architecture of openai/clip-vit-base-patch32
        return CLIPModel(CLIPConfig(text_config=dict(eos_token_id=1, bos_token_id=1, pad_token_id=0))), [
            _byt5_tokenizer(), CLIPImageProcessor()]

    # ByT5 ends each text with </s> = 1: the text tower pools there.
    text = dict(_TEXT, vocab_size=384, max_position_embeddings=128, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=_VISION, projection_dim=24))
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    crop = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    return model, [_byt5_tokenizer(), CLIPImageProcessor(size=size, crop_size=crop)]


def _siglip(base: bool):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    if base:  # ViT-B/16 at 224, the architecture of google/siglip-base-patch16-224
        return SiglipModel(SiglipConfig(text_config=dict(eos_token_id=1, bos_token_id=1, pad_token_id=0))), [
            _byt5_tokenizer(), SiglipImageProcessor()]

    text = dict(_TEXT, vocab_size=384, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=_VISION))
    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    return model, [_byt5_tokenizer(), SiglipImageProcessor(size=size)]


def _xclip(base: bool):
    from transformers import CLIPImageProcessor, XCLIPConfig, XCLIPModel

    if base:  # the architecture of microsoft/xclip-base-patch32 (8 frames)
        return XCLIPModel(XCLIPConfig(text_config=dict(eos_token_id=1, bos_token_id=1, pad_token_id=0))), [
            _byt5_tokenizer(), CLIPImageProcessor()]

    text = dict(_TEXT, vocab_size=384, max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    vision = dict(_VISION, num_frames=8, mit_hidden_size=24, mit_intermediate_size=48, mit_num_attention_heads=2)
    model = XCLIPModel(XCLIPConfig(text_config=text, vision_config=vision, projection_dim=24,
                                   prompt_num_attention_heads=2, prompt_layers=1))
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    crop = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    return model, [_byt5_tokenizer(), CLIPImageProcessor(size=size, crop_size=crop)]


def _grounding_dino(base: bool, workdir: str):
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    vocab = os.path.join(workdir, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(_BERT_WORDS) + "\n")
    if base:  # Swin-T + BERT-base, the architecture of IDEA-Research/grounding-dino-tiny
        return GroundingDinoForObjectDetection(GroundingDinoConfig()), [
            GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=BertTokenizer(vocab))]
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(_BERT_WORDS), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=2, max_text_len=32,
    )
    model = GroundingDinoForObjectDetection(config)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64})
    return model, [GroundingDinoProcessor(image_processor=image_processor, tokenizer=BertTokenizer(vocab))]


def _sam(base: bool):
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    if base:  # ViT-B at 1024, the architecture of facebook/sam-vit-base
        return SamModel(SamConfig()), [SamProcessor(image_processor=SamImageProcessor())]
    config = SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                      image_size=64, patch_size=8, output_channels=16, global_attn_indexes=[0],
                                      window_size=0, num_pos_feats=8),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                 mlp_dim=32, iou_head_hidden_dim=16),
    )
    processor = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64},
                                                               pad_size={"height": 64, "width": 64}))
    return SamModel(config), [processor]


def _dinov2(base: bool):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    if base:  # ViT-B/14 at 224, the architecture of facebook/dinov2-base
        return Dinov2Model(Dinov2Config(image_size=224)), [BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_convert_rgb=True,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])]
    config = Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=TINY_IMAGE_SIZE, patch_size=8)
    size = {"shortest_edge": TINY_IMAGE_SIZE}
    crop = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    return Dinov2Model(config), [BitImageProcessor(size=size, crop_size=crop, image_mean=[0.485, 0.456, 0.406],
                                                   image_std=[0.229, 0.224, 0.225])]


def save_tiny_backbone(kind: str, path: str, seed: int = 0, base: bool = False) -> str:
    """Build the tiny ``kind`` model with ``seed`` and save it (atomically) to ``path``; returns ``path``.

    ``base=True`` builds the released base architecture instead (random weights, real sizes): for
    throughput measurements where checkpoints cannot be downloaded.
    """
    import torch

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny backbone {kind!r}; expected one of {TINY_KINDS}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-", dir=parent)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind == "grounding-dino":
                model, extras = _grounding_dino(base, tmp)
            else:
                model, extras = {"clip": _clip, "siglip": _siglip, "xclip": _xclip, "sam": _sam,
                                  "dinov2": _dinov2}[kind](base)
        model.eval().save_pretrained(tmp, safe_serialization=True)
        if not os.path.isfile(os.path.join(tmp, "config.json")):  # transformers saves on torch.distributed rank 0 only
            raise RuntimeError(f"tiny {kind} was not written to {path!r}: build it outside torch.distributed "
                               "workers (resolve_backbones on the driver)")
        for extra in extras:
            extra.save_pretrained(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve_backbone(spec: str, cache_dir: str = "~/.cache/anisora-ray") -> str:
    """``tiny:<kind>`` (or ``random-base:<kind>``) → the cached random-init folder, built on first use;
    anything else (a Hugging Face id, a path) is returned as is."""
    size, _, kind = spec.partition(":")
    if size not in ("tiny", "random-base") or not kind:
        return spec
    import transformers

    key = hashlib.sha256(f"{kind}|{transformers.__version__}".encode()).hexdigest()[:12]
    path = os.path.join(os.path.expanduser(cache_dir), f"{size}-{kind}-{key}")
    return save_tiny_backbone(kind, path, base=size == "random-base")


def resolve_backbones(options: dict, cache_dir: str | None = None) -> dict:
    """``options`` with every ``tiny:<kind>`` value resolved to its cached folder (for the driver to do once)."""
    cache = cache_dir or options.get("cache_dir", "~/.cache/anisora-ray")
    return {k: resolve_backbone(v, cache) if isinstance(v, str) else v for k, v in options.items()}
