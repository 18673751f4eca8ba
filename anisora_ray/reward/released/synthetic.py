"""A synthetic release: every file the released code loads, in its format and key layout, with
random weights at tiny width, in the code's ``reward/`` layout or the Hub's. Tests convert and score
it; it also shows, file by file, what ``anisora-ray convert-reward --source`` expects. (No real
weights can be downloaded here.)"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from anisora_ray.reward.released import reference as ref
from anisora_ray.reward.released.convert import RELEASED, relative

TINY_VIT = {"image_size": 32, "patch": 16, "dim": 32, "depth": 2, "heads": 1}  # heads = max(1, width // 64)
# The released sizes (random weights): BLIP ViT-B/16 + BERT-base heads, CLIP ViT-B/16 + 6-layer adapter, ViT-L/16.
SIZES = {
    "tiny": {"vit": TINY_VIT, "bert": {"dim": 32, "depth": 2, "heads": 1, "hidden": 64, "positions": 40},
             "text_width": 24, "clip": {"embed": 48, "image_size": 32, "patch": 16, "vision_width": 64,
                                        "vision_layers": 2, "context": 77, "vocab": 514, "text_width": 64,
                                        "text_layers": 2}, "adapter_layers": 2, "vit_l": TINY_VIT, "embed": 16},
    "released": {"vit": {"image_size": 224, "patch": 16, "dim": 768, "depth": 12, "heads": 12},
                 "bert": {"dim": 768, "depth": 12, "heads": 12, "hidden": 3072, "positions": 512}, "text_width": 768,
                 "clip": {"embed": 512, "image_size": 224, "patch": 16, "vision_width": 768, "vision_layers": 12,
                          "context": 77, "vocab": 49408, "text_width": 512, "text_layers": 12}, "adapter_layers": 6,
                 "vit_l": {"image_size": 224, "patch": 16, "dim": 1024, "depth": 24, "heads": 16}, "embed": 256},
}
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "girl", "with", "red", "hair", "runs", "blue", "sky",
              "the", "cat", "jumps", "over", "##s", "long", "sword", "character"]


def _perturb(module: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    with torch.no_grad():  # released heads are trained, not at init: make every path matter
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


def clip_tokenizer(path: str) -> str:
    """A byte-level CLIP BPE tokenizer without merges (a token per character; <|endoftext|> the largest id)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[]).save_pretrained(path)
    return path


def idefics2_regression(path: str, seed: int = 0, words: list[str] | None = None) -> str:
    """A Mantis-style Idefics2 regression folder at tiny width: config, safetensors, processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Idefics2Config, Idefics2ImageProcessor, Idefics2Processor, PreTrainedTokenizerFast

    from anisora_ray.reward.released.idefics2 import REGRESSION_QUERY_PROMPT, _regression_class

    words = sorted(set(REGRESSION_QUERY_PROMPT.replace("{text_prompt}", "").split()) | set(words or BERT_WORDS))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    images = Idefics2ImageProcessor(do_image_splitting=False, size={"shortest_edge": 28, "longest_edge": 56})
    Idefics2Processor(images, tokenizer, image_seq_len=4).save_pretrained(path)
    config = Idefics2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                              resampler_head_dim=8, num_key_value_heads=1),
        text_config=dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=len(tokenizer), rms_norm_eps=1e-5,
                         pad_token_id=0),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), num_labels=1, problem_type="regression")
    torch.manual_seed(seed)
    model = _regression_class()(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 20.0)  # logits of tens, like scores out of 100
        model.score.bias.fill_(50.0)
    model.save_pretrained(path)
    return path


def bert_words(size: str) -> list[str]:
    """The BERT vocabulary: a few words at tiny size; 30522 entries at the released size (bert-base-uncased's count)."""
    return BERT_WORDS if size == "tiny" else BERT_WORDS + [f"tok{i}" for i in range(30522 - len(BERT_WORDS))]


def consistency(text: bool, seed: int = 0, size: str = "tiny") -> ref.BlipConsistency:
    torch.manual_seed(seed)
    s = SIZES[size]
    bert = {"vocab": len(bert_words(size)) + 2, **s["bert"], "encoder_width": s["vit"]["dim"]}
    return _perturb(ref.BlipConsistency(s["vit"], text_width=s["text_width"], text=bert if text else None)).eval()


def actionclip(seed: int = 0, size: str = "tiny") -> ref.ActionClip:
    torch.manual_seed(seed)
    model = ref.ActionClip(SIZES[size]["clip"], segments=8, adapter_layers=SIZES[size]["adapter_layers"]).eval()
    _perturb(model.adapter, 0.05)
    return model


def retrieval(seed: int = 0, size: str = "tiny") -> ref.BlipRetrieval:
    torch.manual_seed(seed)
    return ref.BlipRetrieval(SIZES[size]["vit_l"], embed=SIZES[size]["embed"]).eval()


def write_released_tree(root: str, characters: dict[str, np.ndarray] | None = None, seed: int = 0,
                        size: str = "tiny", layout: str = "code", code: str | None = None) -> str:
    """Every released file under ``root``, in ``layout``: ``code``, the code's ``reward/`` folder (root
    is that folder); ``hub``, a snapshot of the Hub repo (``root/reward/weights``, ``root/reward/
    IP_checkpoints``, ``root/reward/videos.tar.gz`` with a top-level ``videos/``), ``gallerys.json``
    going to a separate clone of the code, ``code`` (default ``<root>-code``), at its
    ``reward/character/BLIP/data/gallerys.json``. ``characters``: name → an RGB crop for the gallery
    (random ones by default). Also writes ``root/clip-tokenizer``. ``size``: ``tiny``, or ``released``
    for the BLIP / CLIP scorers at their released sizes (the two Idefics2-8B regressors stay tiny:
    2 × 8B random weights are a GPU machine's job)."""
    import tarfile
    import tempfile

    from PIL import Image

    if layout not in ("code", "hub"):
        raise ValueError(f"layout must be 'code' or 'hub', got {layout!r}")
    tree = os.path.join(root, "reward") if layout == "hub" else root
    code = (code or root.rstrip("/") + "-code") if layout == "hub" else None

    def path(dimension: str, key: str) -> str:
        if key == "gallery" and code:
            p = os.path.join(code, "reward", RELEASED[dimension][key])
        else:
            p = os.path.join(tree, relative(layout, dimension, key))
        os.makedirs(p if key in ("folder", "tokenizer") or p.endswith("videos") else os.path.dirname(p), exist_ok=True)
        return p

    idefics2_regression(path("visual_smoothness", "folder"), seed)
    idefics2_regression(path("visual_appeal", "folder"), seed + 1)
    ref.save_released(consistency(False, seed, size), path("image_video", "file"))
    ref.save_released(consistency(True, seed, size), path("text_video", "file"))
    with open(os.path.join(path("text_video", "tokenizer"), "vocab.txt"), "w") as f:
        f.write("\n".join(bert_words(size)) + "\n")
    ref.save_released(actionclip(seed, size), path("visual_motion", "file"), container="mmengine")
    ref.save_released(retrieval(seed, size), path("character", "file"))
    rng = np.random.default_rng(seed)
    characters = characters or {n: rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for n in ("Alice", "Bob", "Carol")}
    with tempfile.TemporaryDirectory() as tmp:
        videos = path("character", "gallery_root") if layout == "code" else os.path.join(tmp, "videos")
        entries = []
        for i, (name, crop) in enumerate(characters.items()):
            rel = f"clip{i}/mask_crop/object1_img0.png"
            os.makedirs(os.path.dirname(os.path.join(videos, rel)), exist_ok=True)
            Image.fromarray(crop).save(os.path.join(videos, rel))
            entries.append({"image": rel, "caption": name})
        if layout == "hub":  # the clips' frames and masks are in the tarball too: only the crops are used
            Image.fromarray(characters[next(iter(characters))]).save(os.path.join(videos, "clip0", "00000.jpg"))
            with tarfile.open(path("character", "gallery_root"), "w:gz") as tar:
                tar.add(videos, arcname="videos")
    with open(path("character", "gallery"), "w") as f:
        json.dump(entries, f)
    clip_tokenizer(os.path.join(root, "clip-tokenizer"))
    return root
