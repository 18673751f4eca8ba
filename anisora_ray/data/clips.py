"""A manifest from a folder of clips: the first frame of each clip is its conditioning image, as the
paper builds its image-to-video data, and its caption is the prompt.

``captions`` is .csv or .jsonl with a ``video`` column (file name in the folder) and ``caption`` (or
``prompt``), optionally ``prompt_id`` / ``character_id``; or plain text, one caption per line, paired
with the clips in sorted order. Without a captions file a :class:`Captioner` (a vision-language model,
``generation/captioning.py``) writes each prompt, from the clip's frames or from the image, and the
captions are kept beside the manifest for review (``<manifest>.captions.jsonl``, in the captions-file
format). A clip that cannot be decoded or captioned is set aside with its reason
(``<manifest>.quarantine.parquet`` beside the manifest) and the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from PIL import Image

from anisora_ray.data.manifest import (
    IMAGE_SUFFIXES,
    check_unique_ids,
    checked_id,
    prompt_rows,
    text_field,
    warn_unlisted,
    write_manifest,
)
from anisora_ray.errors import ManifestError, VideoDecodeError
from anisora_ray.io import fs
from anisora_ray.io.images import save_image
from anisora_ray.io.video import read_clip
from anisora_ray.types import PromptItem, QuarantineRecord

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")


@dataclass(frozen=True)
class CaptionRequest:
    """One item to caption: ``kind`` "video" (frames sampled over the clip at ``uri``) or "image"."""

    item_id: str
    uri: str
    kind: str


@dataclass(frozen=True)
class CaptionResult:
    caption: str = ""
    reason: str = ""  # why there is no caption (e.g. an exception's type); "" when there is one
    detail: str = ""


class Captioner(Protocol):
    """Captions a list of requests, one result per request, in order."""

    model: str  # what writes the captions (recorded in the review file)
    template: str  # the instruction it is given

    def __call__(self, requests: Sequence[CaptionRequest]) -> list[CaptionResult]: ...


def _list(folder_uri: str, suffixes: tuple[str, ...], what: str, plural: str) -> list[str]:
    folder_fs, folder = fs.url_to_fs(folder_uri)
    if not folder_fs.isdir(folder):
        raise ManifestError(f"{what} folder {folder_uri!r} does not exist")
    names = sorted(posixpath.basename(p) for p in folder_fs.ls(folder, detail=False) if p.lower().endswith(suffixes))
    if not names:
        raise ManifestError(f"{what} folder {folder_uri!r} holds no {plural} ({', '.join(suffixes)})")
    return names


def list_clips(videos_dir: str) -> list[str]:
    return _list(videos_dir, VIDEO_SUFFIXES, "video", "clips")


def quarantine_uri(out_uri: str) -> str:
    return os.path.splitext(fs.normalize(out_uri))[0] + ".quarantine.parquet"


def captions_uri(out_uri: str) -> str:
    """The generated captions beside the manifest: one JSON line per caption, usable as --captions / --prompts."""
    return os.path.splitext(fs.normalize(out_uri))[0] + ".captions.jsonl"


def caption_items(captioner: Captioner, requests: Sequence[CaptionRequest], names: Sequence[str], key: str,
                  out_uri: str) -> tuple[dict[str, str], list[QuarantineRecord]]:
    """Caption ``requests`` (their file ``names`` go under ``key`` in the review file); returns the captions by
    item id and the items the captioner failed on (or left empty), and writes :func:`captions_uri`."""
    results = captioner(requests) if requests else []
    if len(results) != len(requests):
        raise ManifestError(f"the captioner returned {len(results)} captions for {len(requests)} items")
    captions: dict[str, str] = {}
    bad: list[QuarantineRecord] = []
    review = []
    for request, name, result in zip(requests, names, results, strict=True):
        text = " ".join(result.caption.split())  # one paragraph
        reason = result.reason or ("" if text else "EmptyCaption")
        if reason:
            log.warning("set aside %s: %s %s", request.uri, reason, result.detail)
            bad.append(QuarantineRecord(stage="caption", item_id=request.item_id, reason=reason, uri=request.uri,
                                        detail=(result.detail or "the captioner wrote nothing")[:2000]))
            continue
        captions[request.item_id] = text
        review.append({key: name, "prompt_id": request.item_id, "prompt": text, "model": captioner.model,
                       "template": captioner.template})
    if review:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in review)
        fs.write_bytes(captions_uri(out_uri), lines.encode())
    elif fs.exists(captions_uri(out_uri)):  # an earlier run's captions are not this run's
        fs.remove(captions_uri(out_uri))
    return captions, bad


def _finish(items: list[PromptItem], bad: list[QuarantineRecord], out_uri: str, folder: str) -> None:
    if bad:
        fs.write_table(QuarantineRecord.to_table(bad), quarantine_uri(out_uri))
    elif fs.exists(quarantine_uri(out_uri)):  # an earlier run set aside what this one could use
        fs.remove(quarantine_uri(out_uri))
    if not items:
        raise ManifestError(f"no item of {folder!r} could be used ({len(bad)} set aside: {quarantine_uri(out_uri)})")
    write_manifest(items, out_uri)


def build_manifest_from_videos(videos_dir: str, captions_file: str | None, out_uri: str, images_dir: str | None = None,
                               on_progress=None, captioner: Captioner | None = None,
                               ) -> tuple[list[PromptItem], list[QuarantineRecord]]:
    """Write the manifest (and each clip's first frame as a PNG under ``images_dir``, by default
    ``first-frames/`` beside the manifest); returns the items and the clips set aside. Without
    ``captions_file`` the ``captioner`` writes the prompts (of the clips whose first frame decoded)."""
    clips = list_clips(videos_dir)
    if not captions_file and captioner is None:
        raise ManifestError("build-manifest from clips needs a captions file or a captioner")
    root = fs.normalize(videos_dir)
    images_dir = fs.normalize(images_dir or fs.join(posixpath.dirname(fs.normalize(out_uri)) or ".", "first-frames"))
    items: list[PromptItem] = []
    names: list[str] = []
    bad: list[QuarantineRecord] = []
    source = captions_file or videos_dir
    rows = prompt_rows(captions_file, clips, key="video") if captions_file else [{"video": c} for c in clips]
    for n, row in enumerate(rows):
        video, caption = row.get("video"), row.get("caption") or row.get("prompt")
        if not video or (captions_file and not caption):
            raise ManifestError(f"{captions_file!r} entry {n}: needs 'video' and 'caption' (or 'prompt'), got {row!r}")
        if video not in clips:
            raise ManifestError(f"{captions_file!r} entry {n}: clip {video!r} is not in {videos_dir!r}")
        prompt_id = checked_id(text_field(row, "prompt_id") or os.path.splitext(video)[0], f"{source!r} entry {n}")
        if captions_file and not isinstance(caption, str):
            raise ManifestError(f"{captions_file!r} entry {n}: the caption must be text, got {caption!r}")
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
        items.append(PromptItem(prompt_id=prompt_id, prompt=str(caption or ""), image_uri=image_uri,
                                character_id=text_field(row, "character_id")))
        names.append(video)
        if on_progress:
            on_progress(n + 1, len(rows))
    check_unique_ids(items, source)  # before any captioning
    if captions_file:
        warn_unlisted(clips, [r.get("video") for r in rows], "clip", videos_dir, captions_file)
    if not captions_file:
        requests = [CaptionRequest(i.prompt_id, fs.join(root, n), "video") for i, n in zip(items, names, strict=True)]
        captions, failed = caption_items(captioner, requests, names, "video", out_uri)
        items = [replace(i, prompt=captions[i.prompt_id]) for i in items if i.prompt_id in captions]
        bad += failed
    _finish(items, bad, out_uri, videos_dir)
    return items, bad


def build_manifest_from_images(images_dir: str, out_uri: str, captioner: Captioner,
                               ) -> tuple[list[PromptItem], list[QuarantineRecord]]:
    """A manifest of every image in ``images_dir`` (its own first frame) with a prompt the ``captioner`` writes;
    an image it cannot read or caption is set aside. Returns the items and the images set aside."""
    root = fs.normalize(images_dir)
    names = _list(images_dir, IMAGE_SUFFIXES, "image", "images")
    requests = [CaptionRequest(checked_id(os.path.splitext(name)[0], f"{images_dir!r} image {name!r}"), fs.join(root, name),
                               "image") for name in names]
    check_unique_ids([PromptItem(r.item_id, "", r.uri) for r in requests], images_dir)
    captions, bad = caption_items(captioner, requests, names, "image", out_uri)
    items = [PromptItem(prompt_id=r.item_id, prompt=captions[r.item_id], image_uri=r.uri)
             for r in requests if r.item_id in captions]
    _finish(items, bad, out_uri, images_dir)
    return items, bad
