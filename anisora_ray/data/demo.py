"""A demo prompt set drawn by code: simple anime-style characters on gradient backgrounds.

Nothing is downloaded; the same seed draws the same set. Each character id keeps one species and
colour, so character consistency has something to measure.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from anisora_ray.data.manifest import write_manifest
from anisora_ray.io import fs
from anisora_ray.io.images import save_image
from anisora_ray.types import PromptItem

SPECIES = ("cat", "bunny", "bear", "fox", "slime", "robot", "penguin", "dragon")
COLOURS = {
    "pink": (246, 143, 181),
    "blue": (104, 160, 237),
    "orange": (245, 164, 66),
    "green": (120, 200, 120),
    "purple": (170, 120, 220),
    "white": (240, 240, 245),
}
ACTIONS = (
    "waves hello",
    "jumps with joy",
    "turns around slowly",
    "runs to the left",
    "spins in a circle",
    "nods and smiles",
    "dances happily",
    "looks up at the sky",
)
SCENES = (
    ("in a meadow at noon", (135, 206, 250), (124, 200, 90)),
    ("on a beach at sunset", (250, 170, 120), (240, 220, 160)),
    ("in a night city", (30, 30, 70), (70, 70, 90)),
    ("in a snowy forest", (200, 220, 240), (245, 245, 250)),
    ("inside a classroom", (240, 230, 200), (170, 120, 80)),
)


def _gradient(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    horizon = int(size * 0.62)
    for y in range(size):
        t = y / max(1, horizon) if y < horizon else 1.0
        colour = top if y < horizon else bottom
        if y < horizon:
            colour = tuple(int(a + (b - a) * t * 0.5) for a, b in zip(top, (255, 255, 255), strict=True))
        draw.line([(0, y), (size, y)], fill=colour)
    return image


def draw_character(species: str, colour: tuple[int, int, int], scene: int, size: int, rng: random.Random) -> Image.Image:
    """One first-frame image: background of ``scene``, a ``species`` character in ``colour``."""
    _, top, bottom = SCENES[scene]
    image = _gradient(size, top, bottom)
    draw = ImageDraw.Draw(image)
    s = size / 256
    cx = size / 2 + rng.uniform(-30, 30) * s
    cy = size * 0.55 + rng.uniform(-10, 10) * s
    dark = tuple(max(0, c - 70) for c in colour)
    # body and head
    draw.ellipse([cx - 45 * s, cy, cx + 45 * s, cy + 80 * s], fill=colour, outline=dark, width=max(1, int(3 * s)))
    head = [cx - 50 * s, cy - 85 * s, cx + 50 * s, cy + 10 * s]
    if species == "robot":
        draw.rectangle(head, fill=colour, outline=dark, width=max(1, int(3 * s)))
        draw.line([cx, cy - 85 * s, cx, cy - 110 * s], fill=dark, width=max(1, int(4 * s)))
        draw.ellipse([cx - 7 * s, cy - 118 * s, cx + 7 * s, cy - 104 * s], fill=(255, 60, 60))
    else:
        draw.ellipse(head, fill=colour, outline=dark, width=max(1, int(3 * s)))
    # ears, by species
    if species in ("cat", "fox", "dragon"):
        for side in (-1, 1):
            draw.polygon(
                [(cx + side * 45 * s, cy - 55 * s), (cx + side * 35 * s, cy - 110 * s), (cx + side * 10 * s, cy - 80 * s)],
                fill=colour,
                outline=dark,
            )
    elif species == "bunny":
        for side in (-1, 1):
            draw.ellipse([cx + side * 25 * s - 12 * s, cy - 150 * s, cx + side * 25 * s + 12 * s, cy - 70 * s], fill=colour, outline=dark)
    elif species in ("bear", "penguin"):
        for side in (-1, 1):
            draw.ellipse([cx + side * 40 * s - 15 * s, cy - 95 * s, cx + side * 40 * s + 15 * s, cy - 65 * s], fill=colour, outline=dark)
    # big anime eyes with highlights, and a mouth
    for side in (-1, 1):
        ex = cx + side * 20 * s
        draw.ellipse([ex - 11 * s, cy - 50 * s, ex + 11 * s, cy - 22 * s], fill=(255, 255, 255), outline=(20, 20, 20))
        draw.ellipse([ex - 7 * s, cy - 44 * s, ex + 7 * s, cy - 24 * s], fill=(30, 30, 60))
        draw.ellipse([ex - 4 * s, cy - 42 * s, ex, cy - 37 * s], fill=(255, 255, 255))
    draw.arc([cx - 10 * s, cy - 20 * s, cx + 10 * s, cy - 6 * s], start=20, end=160, fill=(120, 30, 30), width=max(1, int(2 * s)))
    return image


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
