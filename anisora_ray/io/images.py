"""First-frame images at fsspec URLs; a missing or unreadable image raises ImageLoadError naming it."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

from anisora_ray.errors import ImageLoadError
from anisora_ray.io import fs


def load_image(uri: str) -> Image.Image:
    try:
        data = fs.read_bytes(uri)
    except FileNotFoundError:
        raise ImageLoadError(uri, "file does not exist") from None
    if not data:
        raise ImageLoadError(uri, "file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(uri, f"not a readable image ({exc})") from None
    return image.convert("RGB")


def save_image(image: Image.Image, uri: str) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fs.write_bytes(uri, buf.getvalue())
