"""A demo prompt set drawn by code: simple anime-style characters on gradient backgrounds.

Nothing is downloaded; the same seed draws the same set. Each character id keeps one species and
colour, so character consistency has something to measure.
"""

from __future__ import annotations

import random

from anisora_ray.data.manifest import write_manifest
from anisora_ray.drawing import ACTIONS, COLOURS, SCENES, SPECIES, draw_character
from anisora_ray.io import fs
from anisora_ray.io.images import save_image
from anisora_ray.types import PromptItem


def make_demo_set(out_dir: str, num_prompts: int = 16, image_size: int = 256, seed: int = 0, prefix: str = "demo") -> str:
    """Draw ``num_prompts`` first-frame images and write their manifest; returns the manifest URL."""
    rng = random.Random(seed)
    out_dir = fs.normalize(out_dir)
    items = []
    colour_names = list(COLOURS)
    for i in range(num_prompts):
        species = SPECIES[rng.randrange(len(SPECIES))]
        colour = colour_names[rng.randrange(len(colour_names))]
        scene = rng.randrange(len(SCENES))
        action = ACTIONS[rng.randrange(len(ACTIONS))]
        prompt_id = f"{prefix}-{i:04d}"
        image_uri = fs.join(out_dir, "images", f"{prompt_id}.png")
        save_image(draw_character(species, COLOURS[colour], scene, image_size, rng), image_uri)
        prompt = f"An anime-style {colour} {species} {action} {SCENES[scene][0]}, vivid colours, smooth motion"
        items.append(PromptItem(prompt_id, prompt, image_uri, character_id=f"{species}-{colour}"))
    return write_manifest(items, fs.join(out_dir, "prompts.parquet"))


def ensure_demo_set(out_dir: str, num_prompts: int = 16, image_size: int = 256, seed: int = 0, prefix: str = "demo") -> str:
    """The demo manifest under ``out_dir``, drawn on first use and reused afterwards."""
    manifest = fs.join(fs.normalize(out_dir), "prompts.parquet")
    if fs.exists(manifest):
        return manifest
    return make_demo_set(out_dir, num_prompts=num_prompts, image_size=image_size, seed=seed, prefix=prefix)
