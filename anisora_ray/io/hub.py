"""A Hugging Face Hub snapshot, with one clear error when the Hub cannot give it."""

from __future__ import annotations

from typing import Any

from anisora_ray.errors import ConfigError


def snapshot(repo: str, what: str, error: type[ConfigError] = ConfigError, **options: Any) -> str:
    """``huggingface_hub.snapshot_download(repo, **options)``; offline, no such repository or no access is ``error``
    naming ``what`` (e.g. "--base 'org/name'") with the Hub's own last words, not a traceback."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, **options)
    except Exception as exc:  # noqa: BLE001 - the Hub's own words are said
        said = (str(exc).strip().splitlines() or [""])[-1][:300]
        raise error(f"{what} is no local folder, and the Hugging Face Hub did not give it ({type(exc).__name__}: "
                    f"{said}): download it where this runs and pass its folder") from None
