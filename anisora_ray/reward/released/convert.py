"""``anisora-ray convert-reward``: the released AnimeReward files → converted scorer folders.

``source`` is the released ``reward/`` folder as its code expects it (bilibili/Index-anisora
``reward/`` with the weights placed as its READMEs say), or a Hugging Face repo id
(``IndexTeam/Index-anisora``) whose ``reward/`` files are downloaded first. Each dimension becomes
``<out>/<dimension>/``. A scorer whose ``checkpoint`` is not given converts its dimension on first
use into ``<cache_dir>/animereward/`` (once per machine, under a file lock), so a config naming only
``source`` runs out of the box wherever the source can be read.
"""

from __future__ import annotations

import logging
import os

from anisora_ray.reward.released.common import CONFIG, CheckpointError

log = logging.getLogger(__name__)

HUB_SOURCE = "IndexTeam/Index-anisora"
# Paths relative to the released reward/ folder (reward/reward_infer.py and the character pipeline).
RELEASED = {
    "visual_smoothness": {"folder": "weights/mantis-8b-idefics2-video-eval-24frame-benchmark-1epoch_4096_regression/checkpoint-final"},
    "visual_appeal": {"folder": "weights/mantis-8b-idefics2-video-eval-24frame-quality_4096_regression/checkpoint-final"},
    "image_video": {"file": "weights/Pretrain_humangt_meanvideo_trainset_wGT/checkpoint_06.pth"},
    "text_video": {"file": "weights/Pretrain_text_humangt_meanvideo_trainset_wGT_random_samescore/checkpoint_05.pth",
                   "tokenizer": "weights/bert-base-uncased"},
    "visual_motion": {"file": "weights/testvl-pre76-top187-rec69.pth"},
    "character": {"file": "character/IP_checkpoints/blip_checkpoints/animate_recoginzer.pth",
                  "gallery": "character/BLIP/data/gallerys.json", "gallery_root": "character/videos",
                  "detector": "character/IP_checkpoints/grouding-dino-base"},  # (sic) both names, as released
}


def source_root(source: str, dimension: str | None = None) -> str:
    """A local ``reward/`` folder for ``source`` (downloading the needed files of a hub repo)."""
    if os.path.isdir(source):
        return source
    if "/" not in source or source.startswith((".", "/")):
        raise CheckpointError(f"released reward source {source!r} is neither a folder nor a Hugging Face repo id")
    from huggingface_hub import snapshot_download

    entries = RELEASED.values() if dimension is None else [RELEASED[dimension]]
    patterns = [f"reward/{p}{'/**' if k in ('folder', 'tokenizer', 'detector', 'gallery_root') else ''}"
                for e in entries for k, p in e.items()]
    log.info("downloading the released AnimeReward files of %s from %s", dimension or "all dimensions", source)
    return os.path.join(snapshot_download(source, allow_patterns=patterns), "reward")


def released_path(root: str, dimension: str, key: str) -> str:
    path = os.path.join(root, RELEASED[dimension][key])
    if not os.path.exists(path):
        raise CheckpointError(f"{dimension}: the released file {RELEASED[dimension][key]} is not under {root}")
    return path


def convert_dimension(dimension: str, root: str, out_dir: str, clip_tokenizer: str = "openai/clip-vit-base-patch16") -> str:
    """One dimension's released files under ``root`` → ``out_dir`` (returns the folder the scorer loads)."""
    from anisora_ray.reward.released import actionclip, blip, character, idefics2

    if dimension not in RELEASED:
        raise CheckpointError(f"no released scorer for {dimension!r}; released: {sorted(RELEASED)}")
    if dimension in ("visual_smoothness", "visual_appeal"):
        return idefics2.convert_regression(released_path(root, dimension, "folder"), out_dir)
    if dimension in ("image_video", "text_video"):
        text = dimension == "text_video"
        return blip.convert_consistency(released_path(root, dimension, "file"), out_dir, text=text,
                                        tokenizer=released_path(root, dimension, "tokenizer") if text else None)
    if dimension == "visual_motion":
        return actionclip.convert_actionclip(released_path(root, dimension, "file"), out_dir, tokenizer=clip_tokenizer)
    return character.convert_character(released_path(root, dimension, "file"), released_path(root, dimension, "gallery"),
                                       released_path(root, dimension, "gallery_root"), out_dir)


def convert_all(source: str, out: str, dimensions: list[str] | None = None,
                clip_tokenizer: str = "openai/clip-vit-base-patch16") -> dict[str, str]:
    """Every (or the named) released dimension of ``source`` → ``<out>/<dimension>``; returns the folders."""
    root = source_root(source)
    return {d: convert_dimension(d, root, os.path.join(out, d), clip_tokenizer) for d in (dimensions or list(RELEASED))}


def resolve_checkpoint(dimension: str, checkpoint: str | None, source: str, cache_dir: str,
                       clip_tokenizer: str = "openai/clip-vit-base-patch16") -> str:
    """``checkpoint`` when given; else the dimension converted from ``source`` into the cache (once)."""
    if checkpoint:
        return checkpoint
    from filelock import FileLock

    key = source.rstrip("/").replace("/", "--").replace(os.sep, "--").strip("-.")
    out = os.path.join(os.path.expanduser(cache_dir), "animereward", key, dimension)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with FileLock(out + ".lock"):
        done = os.path.join(out, ".converted")
        if os.path.isfile(done):
            with open(done) as f:
                return f.read().strip()
        path = convert_dimension(dimension, source_root(source, dimension), out, clip_tokenizer)
        os.makedirs(out, exist_ok=True)
        with open(done, "w") as f:
            f.write(path)
        return path


def describe(path: str) -> str:
    """One line about a converted folder (what ``convert-reward`` prints)."""
    import json

    config_path = os.path.join(path, CONFIG)
    with open(config_path) as f:
        config = json.load(f)
    family = config.get("family") or (config.get("architectures") or ["?"])[0]
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)
    return f"{family}, {size / 1e6:.1f} MB"
