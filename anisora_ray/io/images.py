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
        return image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageLoadError(uri, "not a readable image (no image format recognised)") from None
    # the bytes were read: whatever fails to decode them is the file's (a truncated or corrupt image, PIL's
    # DecompressionBombError for a header claiming more pixels than Image.MAX_IMAGE_PIXELS allows, ...)
    except Exception as exc:  # noqa: BLE001
        raise ImageLoadError(uri, f"not a readable image ({type(exc).__name__}: {exc})") from None


def save_image(image: Image.Image, uri: str) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fs.write_bytes(uri, buf.getvalue())
