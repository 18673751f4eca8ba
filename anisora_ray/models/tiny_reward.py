"""Tiny random-init reward backbones (CLIP, SigLIP, X-CLIP, GroundingDINO, SAM) built from configs.

Each is saved as a normal transformers folder (weights as safetensors, tokenizer, image processor)
so the reward backends load it with the same ``from_pretrained`` calls as the real checkpoints
(``openai/clip-vit-large-patch14``, ``google/siglip-so400m-patch14-384``, ``microsoft/xclip-base-patch32``,
``IDEA-Research/grounding-dino-tiny``, ``facebook/sam-vit-base``; ``videoscore``: ``TIGER-Lab/VideoScore-v1.1``'s
layout). A backbone spec ``tiny:<kind>`` in a reward option resolves to such a folder, built once and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import types

REVISIONS = {"videoscore": 2}  # kinds whose builder changed since their first cached folders
from anisora_ray.errors import ConfigError

TINY_KINDS = ("clip", "siglip", "xclip", "grounding-dino", "sam", "dinov2", "videoscore", "qwen2-vl")
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


def _videoscore(base: bool):
    """VideoScore's layout (Mantis' ``Idefics2ForSequenceClassification``: ``model.`` = ``Idefics2Model``, ``score``
    → 5 regression outputs; the Idefics2 processor without image splitting) at tiny width, with a byte-level
    tokenizer (``<s>`` first, as Idefics2's) so any prompt tokenizes."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import (
        Idefics2Config,
        Idefics2ImageProcessor,
        Idefics2Model,
        Idefics2Processor,
        PreTrainedTokenizerFast,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PreTrainedModel

    if base:
        raise ValueError("random-base:videoscore is not built (8B random weights): use TIGER-Lab/VideoScore-v1.1")

    class Idefics2ForSequenceClassification(Idefics2PreTrainedModel):  # the released key layout; scored by reward/
        def __init__(self, config):
            super().__init__(config)
            self.model = Idefics2Model(config)
            self.score = torch.nn.Linear(config.text_config.hidden_size, config.num_labels, bias=True)
            self.post_init()

    vocab = ["<unk>", "<s>", "</s>", *bytes_to_unicode().values()]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, [], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="<unk>")
    images = Idefics2ImageProcessor(do_image_splitting=False, size={"shortest_edge": 28, "longest_edge": 56})
    processor = Idefics2Processor(images, tokenizer, image_seq_len=4)  # adds <fake_token_around_image>, <image>
    config = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer), rms_norm_eps=1e-5,
                         pad_token_id=0),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), num_labels=5, problem_type="regression")
    model = Idefics2ForSequenceClassification(config)
    with torch.no_grad():  # scores around the released 1-4 scale
        model.score.weight.normal_(0, 0.1)
        model.score.bias.fill_(2.5)
        # at the 0.02 init the last token barely sees the frames (clips differ by ~1e-5, under the released
        # 3-decimal rounding: every candidate would tie); scaled up, clips differ by ~1e-3 to 1e-2
        for name, p in model.named_parameters():
            if p.ndim >= 2 and ("vision_model" in name or "connector" in name or "self_attn" in name):
                p.mul_(20.0)

    def processor_config(path: str) -> None:  # as released: the image processor in preprocessor_config.json
        with open(os.path.join(path, "processor_config.json"), "w") as f:
            json.dump({"image_seq_len": processor.image_seq_len, "processor_class": "Idefics2Processor"}, f, indent=2)

    return model, [images, processor.tokenizer, types.SimpleNamespace(save_pretrained=processor_config)]


# Qwen/Qwen2-VL-7B-Instruct's special tokens and chat template (frames and images as <|image_pad|> runs).
_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
_QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
_CAPTION_WORDS = ("a the girl boy character with long short silver black hair red blue coat dress smiles turns "
                  "waves walks runs jumps toward left right slowly quickly camera pans zooms tilts in out").split()


def _qwen2_vl(base: bool):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``) at tiny width: a word-level tokenizer with Qwen's special
    tokens and chat template, the PIL image processor at 28-56 px. The LM head never picks a special token,
    so a random model writes words (at most ``max_new_tokens``)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    if base:
        raise ValueError("random-base:qwen2-vl is not built (7B random weights): use Qwen/Qwen2-VL-7B-Instruct")
    vocab = ["<unk>", *_QWEN_SPECIAL, *_CAPTION_WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=_QWEN_SPECIAL[1:])
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2,
                                                                mlp_ratio=2),
                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                           vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight[: 1 + len(_QWEN_SPECIAL)] = 0.0  # <unk>, special tokens: logit 0, below the best word
    return model, [tokenizer, Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)]


def save_tiny_backbone(kind: str, path: str, seed: int = 0, base: bool = False) -> str:
    """Build the tiny ``kind`` model with ``seed`` and save it (atomically) to ``path``; returns ``path``.

    ``base=True`` builds the released base architecture instead (random weights, real sizes): for
    throughput measurements where checkpoints cannot be downloaded.
    """
    import torch

    if kind not in TINY_KINDS:
        raise ConfigError(f"unknown tiny backbone {kind!r}; expected one of {', '.join(TINY_KINDS)}")
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
                                  "dinov2": _dinov2, "videoscore": _videoscore, "qwen2-vl": _qwen2_vl}[kind](base)
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

    revision = f"|r{REVISIONS[kind]}" if kind in REVISIONS else ""  # a changed builder gets a new folder
    key = hashlib.sha256(f"{kind}{revision}|{transformers.__version__}".encode()).hexdigest()[:12]
    path = os.path.join(os.path.expanduser(cache_dir), f"{size}-{kind}-{key}")
    return save_tiny_backbone(kind, path, base=size == "random-base")


def resolve_backbones(options: dict, cache_dir: str | None = None) -> dict:
    """``options`` with every ``tiny:<kind>`` value resolved to its cached folder (for the driver to do once)."""
    cache = cache_dir or options.get("cache_dir", "~/.cache/anisora-ray")
    return {k: resolve_backbone(v, cache) if isinstance(v, str) else v for k, v in options.items()}
