"""A manifest from a folder of clips: the first frame of each clip is its conditioning image, as the
paper builds its image-to-video data, and its caption is the prompt.

``captions`` is .csv or .jsonl with a ``video`` column (file name in the folder) and ``caption`` (or
``prompt``), optionally ``prompt_id`` / ``character_id``; or plain text, one caption per line, paired
with the clips in sorted order. A clip that cannot be decoded is set aside with its reason
(``<manifest>.quarantine.parquet`` beside the manifest) and the others go on.
"""

from __future__ import annotations

import logging
import os
import posixpath

from PIL import Image

from anisora_ray.data.manifest import check_unique_ids, prompt_rows, write_manifest
from anisora_ray.errors import ManifestError, VideoDecodeError
from anisora_ray.io import fs
from anisora_ray.io.images import save_image
from anisora_ray.io.video import read_clip
from anisora_ray.types import PromptItem, QuarantineRecord

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")


def list_clips(videos_dir: str) -> list[str]:
    folder_fs, folder = fs.url_to_fs(videos_dir)
    if not folder_fs.isdir(folder):
        raise ManifestError(f"video folder {videos_dir!r} does not exist")
    clips = sorted(posixpath.basename(p) for p in folder_fs.ls(folder, detail=False) if p.lower().endswith(VIDEO_SUFFIXES))
    if not clips:
        raise ManifestError(f"video folder {videos_dir!r} holds no clips ({', '.join(VIDEO_SUFFIXES)})")
    return clips


def quarantine_uri(out_uri: str) -> str:
    return os.path.splitext(fs.normalize(out_uri))[0] + ".quarantine.parquet"


def build_manifest_from_videos(videos_dir: str, captions_file: str, out_uri: str, images_dir: str | None = None,
                               on_progress=None) -> tuple[list[PromptItem], list[QuarantineRecord]]:
    """Write the manifest (and each clip's first frame as a PNG under ``images_dir``, by default
    ``first-frames/`` beside the manifest); returns the items and the clips set aside."""
    clips = list_clips(videos_dir)
    root = fs.normalize(videos_dir)
    images_dir = fs.normalize(images_dir or fs.join(posixpath.dirname(fs.normalize(out_uri)) or ".", "first-frames"))
    items: list[PromptItem] = []
    bad: list[QuarantineRecord] = []
    rows = prompt_rows(captions_file, clips, key="video")
    for n, row in enumerate(rows):
        video, caption = row.get("video"), row.get("caption") or row.get("prompt")
        if not video or not caption:
            raise ManifestError(f"{captions_file!r} entry {n}: needs 'video' and 'caption' (or 'prompt'), got {row!r}")
        if video not in clips:
            raise ManifestError(f"{captions_file!r} entry {n}: clip {video!r} is not in {videos_dir!r}")
        prompt_id = str(row.get("prompt_id") or os.path.splitext(video)[0])
        uri = fs.join(root, video)
        try:
            first = read_clip(uri, num_frames=1, max_frames=1)[0]
        except VideoDecodeError as exc:
            log.warning("set aside %s: %s", uri, exc)
            bad.append(QuarantineRecord(stage="build-manifest", item_id=prompt_id, reason=type(exc).__name__, uri=uri,
                                        detail=str(exc)[:2000]))
            continue
        image_uri = fs.join(images_dir, f"{prompt_id}.png")
        save_image(Image.fromarray(first), image_uri)
        items.append(PromptItem(prompt_id=prompt_id, prompt=str(caption), image_uri=image_uri,
                                character_id=row.get("character_id") or None))
        if on_progress:
            on_progress(n + 1, len(rows))
    check_unique_ids(items, captions_file)
    if bad:
        fs.write_table(QuarantineRecord.to_table(bad), quarantine_uri(out_uri))
    if not items:
        raise ManifestError(f"no clip of {videos_dir!r} could be decoded ({len(bad)} set aside: {quarantine_uri(out_uri)})")
    write_manifest(items, out_uri)
    return items, bad
