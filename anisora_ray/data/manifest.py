"""Prompt manifests: parquet with ``prompt_id``, ``prompt``, ``image_uri`` and optional ``character_id``.

Read and written through fsspec, so local paths, ``memory://``, ``s3://`` and ``gs://`` work alike.
Relative ``image_uri`` values are resolved against the manifest's folder.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import posixpath
from collections.abc import Sequence

import pyarrow as pa

from anisora_ray.errors import ConfigError, ManifestError
from anisora_ray.io import fs
from anisora_ray.types import PromptItem, id_problem

REQUIRED_COLUMNS = ("prompt_id", "prompt", "image_uri")
log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _clean(uri: str) -> str:
    """``..`` and ``.`` folded away, so one file has one name (the held-out set's overlap check compares them)."""
    if fs.is_url(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(uri)


def _resolve(image_uri: str, manifest_uri: str) -> str:
    if fs.is_url(image_uri) or os.path.isabs(image_uri):
        return _clean(image_uri)
    base = fs.normalize(manifest_uri)
    if fs.is_url(base):
        return _clean(posixpath.join(posixpath.dirname(base), image_uri))
    return _clean(os.path.join(os.path.dirname(base), image_uri))


def read_manifest(uri: str) -> list[PromptItem]:
    """Read and check a manifest; errors name the file, the column or the row."""
    try:
        table = fs.read_table(uri)
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri!r} does not exist") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {uri!r} is not a readable parquet file: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"manifest {uri!r} lacks column(s) {missing}; it has {table.column_names}")
    _check_types(table, uri)
    items: list[PromptItem] = []
    seen: set[str] = set()
    for row_number, row in enumerate(table.to_pylist()):
        for column in REQUIRED_COLUMNS:
            if text_field(row, column) is None:  # None, blank, or NaN (pandas' missing value)
                raise ManifestError(f"manifest {uri!r} row {row_number}: empty {column}")
        prompt_id = checked_id(text_field(row, "prompt_id"), f"manifest {uri!r} row {row_number}")
        if prompt_id in seen:
            raise ManifestError(f"manifest {uri!r} row {row_number}: duplicate prompt_id {prompt_id!r}")
        seen.add(prompt_id)
        items.append(
            PromptItem(
                prompt_id=prompt_id,
                prompt=str(row["prompt"]),
                image_uri=_resolve(str(row["image_uri"]), uri),
                character_id=text_field(row, "character_id"),
            )
        )
    if not items:
        raise ManifestError(f"manifest {uri!r} has no rows: nothing to generate")
    return items


def _check_types(table: pa.Table, uri: str) -> None:
    """Text columns hold text (a list or a struct would reach the generator as its Python repr); ids may be integers."""
    for column in ("prompt_id", "prompt", "image_uri", "character_id"):
        if column not in table.column_names:
            continue
        kind = table.schema.field(column).type
        kind = kind.value_type if pa.types.is_dictionary(kind) else kind  # pandas' categorical columns
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind) \
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)
        number = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)  # pandas: an
        # int column with a missing value is float
        if not (text or (number and column in ("prompt_id", "character_id"))):
            wanted = "text or integers" if column in ("prompt_id", "character_id") else "text"
            raise ManifestError(f"manifest {uri!r} column {column!r} holds {kind}, expected {wanted}")


def checked_id(prompt_id: str, where: str) -> str:
    """``prompt_id``, which names its videos' folder: refused with ``where`` when it cannot (types.id_problem)."""
    problem = id_problem(prompt_id)
    if problem:
        raise ManifestError(f"{where}: prompt_id {prompt_id!r} {problem}")
    return prompt_id


def write_manifest(items: Sequence[PromptItem], uri: str) -> str:
    if not items:
        raise ManifestError(f"refusing to write an empty manifest to {uri!r}")
    fs.write_table(PromptItem.to_table(items), uri)
    return uri


def prompt_rows(prompts_file: str, names: list[str], key: str = "image") -> list[dict[str, str]]:
    """The rows of a prompts file: .jsonl / .csv as written, or plain text paired with ``names`` (sorted) under ``key``."""
    raw = fs.read_bytes(prompts_file)
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Excel's UTF-8 CSV) would join the first column's name
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(f"prompts file {prompts_file!r} is not UTF-8 text: byte {exc.start} (line {line}) is "
                            f"{raw[exc.start:exc.start + 1]!r}; re-save it as UTF-8") from None
    suffix = os.path.splitext(prompts_file)[1].lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ManifestError(f"{prompts_file!r} line {n}: not JSON ({exc})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{prompts_file!r} line {n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
        return rows
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != len(names):
        raise ManifestError(
            f"{prompts_file!r} has {len(lines)} prompt lines for {len(names)} {key}s; a plain text file "
            f"pairs prompts with {key}s in sorted order, so the counts must match (or use .csv/.jsonl "
            f"with a {key!r} column)"
        )
    return [{key: name, "prompt": line} for name, line in zip(names, lines, strict=True)]


def build_manifest(images_dir: str, prompts_file: str, out_uri: str) -> list[PromptItem]:
    """Make a manifest from a folder of images and a prompts file.

    ``prompts_file`` is .csv or .jsonl with columns ``image`` (file name in the folder), ``prompt``
    and optional ``prompt_id`` / ``character_id``; or plain text, one prompt per line, paired with
    the images in sorted order.
    """
    folder_fs, folder = fs.url_to_fs(images_dir)
    if not folder_fs.isdir(folder):
        raise ManifestError(f"image folder {images_dir!r} does not exist")
    images = sorted(
        posixpath.basename(p) for p in folder_fs.ls(folder, detail=False) if p.lower().endswith(IMAGE_SUFFIXES)
    )
    items, rows = [], prompt_rows(prompts_file, images)
    for n, row in enumerate(rows):
        if not row.get("image") or not row.get("prompt"):
            raise ManifestError(f"{prompts_file!r} entry {n}: needs 'image' and 'prompt', got {row!r}")
        if not isinstance(row["prompt"], str):
            raise ManifestError(f"{prompts_file!r} entry {n}: 'prompt' must be text, got {row['prompt']!r}")
        if row["image"] not in images:
            raise ManifestError(f"{prompts_file!r} entry {n}: image {row['image']!r} is not in {images_dir!r}")
        items.append(
            PromptItem(
                prompt_id=checked_id(text_field(row, "prompt_id") or os.path.splitext(row["image"])[0],
                                     f"{prompts_file!r} entry {n}"),
                prompt=row["prompt"],
                image_uri=fs.join(fs.normalize(images_dir), row["image"]),
                character_id=text_field(row, "character_id"),
            )
        )
    check_unique_ids(items, prompts_file)
    warn_unlisted(images, [r.get("image") for r in rows], "image", images_dir, prompts_file)
    write_manifest(items, out_uri)
    return items


def warn_unlisted(found: Sequence[str], listed: Sequence[str | None], what: str, folder: str, listing: str) -> list[str]:
    """The files of ``folder`` that ``listing`` leaves out, said once (a captions file may name a subset on purpose,
    but a clip left out by mistake would otherwise go unnoticed); returns them."""
    unlisted = sorted(set(found) - set(listed))
    if unlisted:
        log.warning("%d %s(s) in %s are not in %s and are left out of the manifest: %s%s", len(unlisted), what, folder,
                    listing, ", ".join(unlisted[:5]), " ..." if len(unlisted) > 5 else "")
    return unlisted


def text_field(row: dict, key: str) -> str | None:
    """An id column as text (a .jsonl may give ``"character_id": 0``; pandas writes an integer column with a
    missing value as floats: ``3.0`` is ``"3"``), None when absent, empty or NaN."""
    value = row.get(key)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        value = int(value) if value.is_integer() else value
    return None if value is None or str(value).strip() == "" else str(value)


def check_unique_ids(items: Sequence[PromptItem], source: str) -> None:
    ids = [item.prompt_id for item in items]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ManifestError(f"{source!r}: duplicate prompt_id(s) {duplicates}")


MISSING_PROMPTS = (
    "{keys} not set: this config trains and evaluates on your own data. Make a manifest from a folder of "
    "clips (the first frame of each becomes its image): `anisora-ray build-manifest --videos CLIPS_DIR "
    "--captions captions.csv --out MANIFEST.parquet` (or `--images DIR --prompts FILE`), then pass "
    "`--set {key}=MANIFEST.parquet` (docs/data.md walks through it); `{key}=demo` uses the drawn demo set."
)


def require_prompts(data_prompts: str | None, eval_prompts: str | None | bool = False) -> None:
    """A clear error when a real config names no manifest (``None``), both named at once; ``eval_prompts=False``:
    not needed."""
    unset = [key for key, value in (("data.prompts", data_prompts), ("eval.prompts", eval_prompts)) if value is None]
    if unset:
        held_out = (" Held-out prompts and images (eval.prompts) must not appear in data.prompts."
                    if "eval.prompts" in unset else "")
        raise ConfigError(MISSING_PROMPTS.format(keys=" and ".join(unset) + (" are" if len(unset) > 1 else " is"), key=unset[0]) + held_out)
