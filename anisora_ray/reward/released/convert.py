"""``anisora-ray convert-reward``: the released AnimeReward files → converted scorer folders.

The files come in two layouts, told apart by what is on disk:

- ``hub``: the Hugging Face repo ``IndexTeam/Index-anisora`` (an id, downloaded with the patterns
  below, or a local snapshot): ``reward/weights/...``, ``reward/IP_checkpoints/...`` and the gallery
  crops as one tarball, ``reward/videos.tar.gz`` (with or without a top-level ``videos/``);
- ``code``: the ``reward/`` folder of bilibili/Index-anisora with the files placed as its READMEs
  say: ``weights/...``, ``character/IP_checkpoints/...``, ``character/videos/``.

``gallerys.json`` (the gallery's names) is only in the GitHub repo, at
``reward/character/BLIP/data/gallerys.json``: the code layout has it; with the Hub, ``code`` names a
clone (or the file). Each dimension becomes ``<out>/<dimension>/``. A scorer whose ``checkpoint`` is
not given converts its dimension on first use into ``<cache_dir>/animereward/`` (once per machine,
under a file lock), so a config naming only ``source`` (and ``code``) runs wherever they can be read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from anisora_ray.reward.released.common import CONFIG, CheckpointError

log = logging.getLogger(__name__)

HUB_SOURCE, GITHUB = "IndexTeam/Index-anisora", "bilibili/Index-anisora"
# Paths relative to the code's reward/ folder (reward/reward_infer.py and the character pipeline).
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
# The Hub's paths (relative to its reward/) where they differ from the code's; gallerys.json is not on the Hub.
HUB_PATHS = {"file": "IP_checkpoints/blip_checkpoints/animate_recoginzer.pth",
             "detector": "IP_checkpoints/grouding-dino-base", "gallery_root": "videos.tar.gz"}
FOLDERS = ("folder", "tokenizer", "detector", "gallery_root")


def relative(layout: str, dimension: str, key: str) -> str:
    """A released file's path relative to the ``reward/`` folder of ``layout``."""
    if layout == "hub" and dimension == "character" and key in HUB_PATHS:
        return HUB_PATHS[key]
    return RELEASED[dimension][key]


@dataclass
class ReleasedTree:
    """A local copy of the released files: ``root`` is its ``reward/`` folder; ``code`` a clone of
    bilibili/Index-anisora (or its ``gallerys.json``) when the tree lacks that file."""

    root: str
    layout: str  # "hub", "code", or "weights" (only weights/: either layout, no character files)
    code: str | None = None

    def find(self, dimension: str, key: str) -> str | None:
        if key == "gallery":
            return self.gallery_json()
        layouts = [self.layout] if self.layout != "weights" else ["code", "hub"]
        for layout in layouts:
            if os.path.exists(path := os.path.join(self.root, relative(layout, dimension, key))):
                return path
        return None

    def path(self, dimension: str, key: str) -> str:
        """A released file, or an error naming it and the layout looked for."""
        if (path := self.find(dimension, key)) is not None:
            return path
        if key == "gallery":
            raise CheckpointError(
                f"character: gallerys.json not found (looked in: {', '.join(self.gallery_candidates())}). It is not on "
                f"the Hub: it is in the GitHub repository {GITHUB} at reward/{RELEASED['character']['gallery']}; clone "
                "it and pass its folder (or the file) as --code / reward.dimensions.character.options.code")
        layouts = [self.layout] if self.layout != "weights" else ["code", "hub"]
        wanted = " or ".join(f"{relative(lay, dimension, key)} ({lay} layout)" for lay in layouts)
        raise CheckpointError(f"{dimension}: the released file {wanted} is not under {self.root}")

    def gallery_candidates(self) -> list[str]:
        rel = RELEASED["character"]["gallery"]
        found = []
        if self.code:
            found = [self.code] if self.code.endswith(".json") else [
                os.path.join(self.code, "reward", rel), os.path.join(self.code, rel)]
        return found + [os.path.join(self.root, rel)]

    def gallery_json(self) -> str | None:
        if self.code and not os.path.exists(self.code):
            raise CheckpointError(f"character: code {self.code} does not exist (a clone of {GITHUB}, or its gallerys.json)")
        return next((p for p in self.gallery_candidates() if os.path.isfile(p)), None)


def find_tree(folder: str, code: str | None = None) -> ReleasedTree:
    """The released tree in ``folder`` (a Hub snapshot, its ``reward/``, a code clone, or the code's ``reward/``)."""
    roots = [r for r in (os.path.join(folder, "reward"), folder) if os.path.isdir(r)]
    checks = [("hub", "IP_checkpoints"), ("code", "character/IP_checkpoints"), ("hub", HUB_PATHS["gallery_root"]),
              ("code", "character"), ("weights", "weights")]
    for layout, rel in checks:  # the character checkpoints first: a clone always has character/ (its code)
        if root := next((r for r in roots if os.path.exists(os.path.join(r, rel))), None):
            return ReleasedTree(root, layout, code)
    return ReleasedTree(folder, "weights", code)  # nothing found: errors then name the file looked for


def hub_patterns(dimensions, detector: bool = False) -> list[str]:
    """``snapshot_download`` patterns of the Hub layout for ``dimensions``."""
    patterns = []
    for dimension in dimensions:
        for key in RELEASED[dimension]:
            if key == "gallery" or (key == "detector" and not detector):
                continue
            rel = relative("hub", dimension, key)
            patterns.append(f"reward/{rel}/**" if key in FOLDERS and not rel.endswith(".tar.gz") else f"reward/{rel}")
    return patterns


def released_tree(source: str, code: str | None = None, dimensions: list[str] | None = None,
                  detector: bool = False) -> ReleasedTree:
    """The local tree of ``source`` (a folder, or a Hub repo id whose files for ``dimensions`` are downloaded)."""
    if os.path.isdir(source):
        return find_tree(source, code)
    if "/" not in source or source.startswith((".", "/", "~")):
        raise CheckpointError(f"released reward source {source!r} is neither a folder nor a Hugging Face repo id")
    from anisora_ray.io import hub

    dimensions = dimensions or list(RELEASED)
    log.info("downloading the released AnimeReward files of %s from %s", ", ".join(dimensions), source)
    folder = hub.snapshot(source, f"released reward source {source!r}", CheckpointError,
                          allow_patterns=hub_patterns(dimensions, detector))
    return ReleasedTree(os.path.join(folder, "reward"), "hub", code)


def convert_dimension(dimension: str, tree: ReleasedTree, out_dir: str,
                      clip_tokenizer: str = "openai/clip-vit-base-patch16") -> str:
    """One dimension's released files in ``tree`` → ``out_dir`` (returns the folder the scorer loads)."""
    from anisora_ray.reward.released import actionclip, blip, character, idefics2

    if dimension not in RELEASED:
        raise CheckpointError(f"no released scorer for {dimension!r}; released: {sorted(RELEASED)}")
    if dimension in ("visual_smoothness", "visual_appeal"):
        return idefics2.convert_regression(tree.path(dimension, "folder"), out_dir)
    if dimension in ("image_video", "text_video"):
        text = dimension == "text_video"
        return blip.convert_consistency(tree.path(dimension, "file"), out_dir, text=text,
                                        tokenizer=tree.path(dimension, "tokenizer") if text else None)
    if dimension == "visual_motion":
        return actionclip.convert_actionclip(tree.path(dimension, "file"), out_dir, tokenizer=clip_tokenizer)
    return character.convert_character(tree.path(dimension, "file"), tree.path(dimension, "gallery"),
                                       tree.path(dimension, "gallery_root"), out_dir)


def convert_all(source: str | ReleasedTree, out: str, dimensions: list[str] | None = None,
                clip_tokenizer: str = "openai/clip-vit-base-patch16", code: str | None = None) -> dict[str, str]:
    """Every (or the named) released dimension of ``source`` → ``<out>/<dimension>``; returns the folders."""
    dimensions = dimensions or list(RELEASED)
    tree = source if isinstance(source, ReleasedTree) else released_tree(source, code, dimensions)
    return {d: convert_dimension(d, tree, os.path.join(out, d), clip_tokenizer) for d in dimensions}


def resolve_checkpoint(dimension: str, checkpoint: str | None, source: str, cache_dir: str,
                       clip_tokenizer: str = "openai/clip-vit-base-patch16", code: str | None = None) -> str:
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
        path = convert_dimension(dimension, released_tree(source, code, [dimension]), out, clip_tokenizer)
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
