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


DRAW_FILE = "draw.json"  # how the set in a folder was drawn


def ensure_demo_set(out_dir: str, num_prompts: int = 16, image_size: int = 256, seed: int = 0, prefix: str = "demo",
                    settings: str = "") -> str:
    """The demo manifest under ``out_dir``, drawn on first use and reused afterwards, by a config asking for the same
    draw (else a ``ConfigError`` naming ``settings``, the config keys behind the draw: another draw would pair a job's
    rounds over other prompts and images)."""
    import json

    from anisora_ray.errors import ConfigError

    folder = fs.normalize(out_dir)
    manifest, record = fs.join(folder, "prompts.parquet"), fs.join(folder, DRAW_FILE)
    wanted = {"num_prompts": num_prompts, "image_size": image_size, "seed": seed, "prefix": prefix}
    if fs.exists(manifest):
        drawn = json.loads(fs.read_bytes(record)) if fs.exists(record) else None  # None: a set from before the record
        if drawn is not None and drawn != wanted:
            raise ConfigError(f"the demo set in {folder} was drawn with {drawn}; this config asks for {wanted}"
                              f"{f' ({settings})' if settings else ''}: use the settings it was drawn with, set "
                              "run.output_dir elsewhere, or delete that folder to draw again (a job it belongs to "
                              "would then compare other prompts)")
        return manifest
    uri = make_demo_set(out_dir, num_prompts=num_prompts, image_size=image_size, seed=seed, prefix=prefix)
    fs.write_bytes(record, json.dumps(wanted, sort_keys=True).encode())
    return uri
