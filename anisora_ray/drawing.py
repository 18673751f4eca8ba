"""Procedural anime-style characters: the demo set's first-frame images (``data.demo``) and the tiny
generator's warm-start clips (``models.tiny_warmstart``) are drawn by the same code, so the tiny model
learns on what it is evaluated on. Pillow only; below ``data`` and ``models`` in the layering."""

from __future__ import annotations

import functools
import random

from PIL import Image, ImageDraw

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


@functools.lru_cache(maxsize=64)  # 5 scenes x a few sizes; callers copy before drawing on it
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
    s = size / 256
    cx = size / 2 + rng.uniform(-30, 30) * s
    cy = size * 0.55 + rng.uniform(-10, 10) * s
    return draw_frame(species, colour, scene, size, cx, cy)


def draw_frame(species: str, colour: tuple[int, int, int], scene: int, size: int, cx: float, cy: float) -> Image.Image:
    """The background of ``scene`` with the character centred at (``cx``, ``cy``) pixels."""
    _, top, bottom = SCENES[scene]
    image = _gradient(size, top, bottom).copy()
    _draw_figure(ImageDraw.Draw(image), species, colour, cx, cy, size / 256)
    return image


def _draw_figure(draw: ImageDraw.ImageDraw, species: str, colour: tuple[int, int, int], cx: float, cy: float,
                 s: float) -> None:
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
