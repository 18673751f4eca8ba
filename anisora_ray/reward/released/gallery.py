"""The released character gallery: ``gallerys.json`` entries (``{"image": "<clip>/mask_crop/objectK_imgJ.jpg",
"caption": "<name>"}``, image paths relative to the code's ``character/videos/``) and their crops.

Conversion copies the crops into the converted folder (``gallery/``), from the code's folder or
straight out of the Hub's ``videos.tar.gz`` (only the named regular files, tarfile's ``data``
filter: no absolute paths, no ``..``, no links). The scorer embeds them once, on its own device,
and caches the embeddings beside the weights (``gallery.safetensors``, written atomically under a
file lock, keyed by a hash of the weights file and the gallery list): later actors load them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tarfile

import torch

from anisora_ray.reward.released.common import WEIGHTS, CheckpointError, released_pixels

log = logging.getLogger(__name__)

FOLDER, CACHE = "gallery", "gallery.safetensors"


def read_entries(gallery_json: str) -> list[dict]:
    """The entries of ``gallerys.json``, each image a relative path that stays inside the gallery."""
    try:
        with open(gallery_json) as f:
            entries = json.load(f)
        images = [posixpath.normpath(str(e["image"]).replace("\\", "/")) for e in entries]
        names = [str(e["caption"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"character gallery {gallery_json} cannot be read: {exc!r}") from exc
    bad = [i for i in images if i.startswith(("/", "../")) or i in ("..", ".")]
    if bad:
        raise CheckpointError(f"character gallery {gallery_json}: image paths outside the gallery: {bad[:5]}")
    return [{"image": i, "name": n} for i, n in zip(images, names, strict=True)]


def extract(tarball: str, images: list[str], dest: str) -> None:
    """The members ``images`` (relative to the videos folder) of ``tarball`` into ``dest``, with or
    without a top-level ``videos/`` in the tarball; anything else in it is skipped."""
    wanted, found = set(images), set()
    try:
        with tarfile.open(tarball, "r:*") as tar:
            for member in tar:  # one pass: a .tar.gz is read in order
                name = posixpath.normpath(member.name)
                rel = name if name in wanted else name.removeprefix("videos/") if name.startswith("videos/") else None
                if rel not in wanted or rel in found or not member.isfile():
                    continue
                member.name = rel  # a checked relative path; a regular file (no link, no device)
                tar.extract(member, dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                found.add(rel)
    except (OSError, tarfile.TarError) as exc:
        raise CheckpointError(f"character gallery tarball {tarball} cannot be read: {exc!r}") from exc
    if missing := sorted(wanted - found):
        raise CheckpointError(f"character gallery: {len(missing)} image(s) of gallerys.json are not in {tarball} "
                              f"(as <image> or videos/<image>): {missing[:5]}")


def collect(gallery_json: str, source: str, out_dir: str) -> list[dict]:
    """The crops of ``gallery_json`` from ``source`` (a folder, or the Hub's tarball) → ``out_dir/gallery/``;
    returns the entries with images relative to ``out_dir`` and names lower-cased (as released)."""
    from PIL import Image

    entries = read_entries(gallery_json)
    if len({e["name"].lower() for e in entries}) < 2:
        raise CheckpointError(f"character gallery {gallery_json}: fewer than 2 names; the softmax needs at least 2")
    dest = os.path.join(out_dir, FOLDER)
    partial = dest + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    images = sorted({e["image"] for e in entries})
    if os.path.isdir(source):
        for rel in images:
            os.makedirs(os.path.dirname(os.path.join(partial, rel)), exist_ok=True)
            try:
                shutil.copyfile(os.path.join(source, rel), os.path.join(partial, rel))
            except OSError as exc:
                raise CheckpointError(f"character gallery image {os.path.join(source, rel)} cannot be read: {exc}") from exc
    else:
        extract(source, images, partial)
    for rel in images:
        try:
            with Image.open(os.path.join(partial, rel)) as im:
                im.verify()
        except Exception as exc:  # PIL raises many types
            raise CheckpointError(f"character gallery image {rel} (from {source}) is not an image: {exc!r}") from exc
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(partial, dest)
    return [{"image": posixpath.join(FOLDER, e["image"]), "name": e["name"].lower()} for e in entries]


def cache_key(checkpoint: str, config: dict) -> str:
    """sha256 of the weights file and of the gallery list (images, names, input size)."""
    digest = hashlib.sha256()
    with open(os.path.join(checkpoint, WEIGHTS), "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    listing = [config["gallery_images"], config["gallery_names"], config["vision"]["image_size"]]
    digest.update(json.dumps(listing).encode())
    return digest.hexdigest()


def _load(path: str, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    with safe_open(path, "pt") as f:
        return f.get_tensor("embeddings") if (f.metadata() or {}).get("key") == key else None


@torch.no_grad()
def embed(model: torch.nn.Module, checkpoint: str, images: list[str], size: int, device, batch: int) -> torch.Tensor:
    """Raw ``vision_proj`` embeddings of the gallery crops, bicubic to ``size`` with CLIP statistics (as released)."""
    import numpy as np
    from PIL import Image

    out = []
    for i in range(0, len(images), batch):
        arrays = []
        for rel in images[i : i + batch]:
            try:
                arrays.append(np.asarray(Image.open(os.path.join(checkpoint, rel)).convert("RGB")))
            except OSError as exc:
                raise CheckpointError(f"character gallery image {os.path.join(checkpoint, rel)} cannot be read: {exc}") from exc
        out.append(model(released_pixels(arrays, size, device)).float())
    return torch.cat(out)


def gallery_embeddings(model: torch.nn.Module, checkpoint: str, config: dict, device, cache_dir: str,
                       batch: int = 64) -> tuple[torch.Tensor, bool]:
    """The gallery's embeddings [G, E] on ``device`` and whether this call embedded them (else: the cache).
    The cache is ``<checkpoint>/gallery.safetensors``, or under ``cache_dir`` when that folder is read-only."""
    from filelock import FileLock
    from safetensors.torch import save_file

    if "gallery_images" not in config:  # a folder converted when the gallery was embedded at conversion
        from safetensors.torch import load_file

        return load_file(os.path.join(checkpoint, CACHE))["embeddings"].to(device), False
    key = cache_key(checkpoint, config)
    path = os.path.join(checkpoint, CACHE)
    if not os.access(checkpoint, os.W_OK):
        path = os.path.join(os.path.expanduser(cache_dir), "animereward", "galleries", f"{key[:32]}.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if (cached := _load(path, key)) is not None:
        return cached.to(device), False
    with FileLock(path + ".lock"):
        if (cached := _load(path, key)) is not None:  # another actor embedded it meanwhile
            return cached.to(device), False
        log.info("embedding the %d-image character gallery of %s on %s", len(config["gallery_images"]), checkpoint, device)
        embeddings = embed(model, checkpoint, config["gallery_images"], config["vision"]["image_size"], device, batch)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file({"embeddings": embeddings.cpu().contiguous()}, tmp, metadata={"key": key})
        os.replace(tmp, path)
        return embeddings, True
