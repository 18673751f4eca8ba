"""First-frame images at fsspec URLs; a missing or unreadable image raises ImageLoadError naming it.

Every image reaches the models as 8-bit RGB: 16-bit and 32-bit integer images are scaled down (not clipped, which
turns most of a 16-bit image white), transparency is flattened onto white (the colour hidden under transparent
pixels is not the picture), and float images, whose value range a file does not say, are refused.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image, UnidentifiedImageError

from anisora_ray.errors import ImageLoadError
from anisora_ray.io import fs

log = logging.getLogger(__name__)
BACKGROUND = (255, 255, 255)  # what transparent pixels become


def load_image(uri: str) -> Image.Image:
    try:
        data = fs.read_bytes(uri)
    except FileNotFoundError:
        raise ImageLoadError(uri, "file does not exist") from None
    except fs.ITEM_READ_ERRORS as exc:  # a folder, no read permission, an unknown protocol
        raise ImageLoadError(uri, f"cannot be read ({type(exc).__name__}: {exc})") from None
    if not data:
        raise ImageLoadError(uri, "file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except UnidentifiedImageError:
        raise ImageLoadError(uri, "not a readable image (no image format recognised)") from None
    # the bytes were read: whatever fails to decode them is the file's (a truncated or corrupt image, PIL's
    # DecompressionBombError for a header claiming more pixels than Image.MAX_IMAGE_PIXELS allows, ...)
    except Exception as exc:  # noqa: BLE001
        raise ImageLoadError(uri, f"not a readable image ({type(exc).__name__}: {exc})") from None
    try:
        return to_rgb(image, uri)
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a mode PIL cannot convert (LAB, ...)
        raise ImageLoadError(uri, f"mode {image.mode} cannot be converted to RGB ({type(exc).__name__}: {exc})") from None


def to_rgb(image: Image.Image, uri: str) -> Image.Image:
    """``image`` as 8-bit RGB (see the module's docstring)."""
    transparent = "transparency" in image.info  # a palette's or a colour key's (has_transparency_data: Pillow 10.1+)
    if image.mode == "RGB" and not transparent:
        return image
    if image.mode == "F":
        raise ImageLoadError(uri, "a floating-point image (mode F) has no known value range: save it as 8- or 16-bit")
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I (32-bit): scaled by the bit depth, not clipped at 255
        values = np.asarray(image).astype(np.int64)
        if values.min() < 0:
            raise ImageLoadError(uri, f"mode {image.mode} holds negative values: not an image's brightness")
        top = 65535 if image.mode.startswith("I;16") or values.max() <= 65535 else 2**32 - 1
        scaled = (values * 255 + top // 2) // top if values.max() > 255 or image.mode.startswith("I;16") else values
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode in ("P", "L", "RGB") and transparent):
        rgba = image.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:  # some pixel is not opaque
            log.warning("%s has transparent pixels: flattened onto white", uri)
        flat = Image.new("RGB", rgba.size, BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def save_image(image: Image.Image, uri: str) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    fs.write_bytes(uri, buf.getvalue())
