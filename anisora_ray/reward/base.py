"""The interface every reward dimension implements, and the registry that builds them by name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from anisora_ray.errors import ConfigError
from anisora_ray.types import DIMENSIONS


@dataclass(frozen=True)
class ClipBatch:
    """Decoded clips with what they were generated from.

    ``frames``: B clips of uint8 [N, H, W, 3] (N may differ between clips); ``images``: the B
    first-frame images, uint8 [H', W', 3]; ``references``: per clip a reference image of the
    character (or None: the first-frame image stands in); ``character_ids``: per clip the id of the
    prompt's character (the manifest's ``character_id``), which selects its gallery entries.
    """

    frames: list[np.ndarray]
    prompts: list[str]
    images: list[np.ndarray]
    references: list[np.ndarray | None]
    character_ids: list[str | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.frames)
        if self.character_ids is None:
            object.__setattr__(self, "character_ids", [None] * n)
        if len(self.character_ids) != n:
            raise ValueError(f"ClipBatch fields disagree in length: frames {n}, character_ids {len(self.character_ids)}")
        if not (len(self.prompts) == len(self.images) == len(self.references) == n):
            raise ValueError(
                f"ClipBatch fields disagree in length: frames {n}, prompts {len(self.prompts)}, "
                f"images {len(self.images)}, references {len(self.references)}"
            )
        for i, clip in enumerate(self.frames):
            if clip.ndim != 4 or clip.shape[-1] != 3 or clip.dtype != np.uint8:
                raise ValueError(f"clip {i}: expected uint8 [N, H, W, 3], got {clip.dtype} {clip.shape}")

    def __len__(self) -> int:
        return len(self.frames)

    def part(self, start: int, stop: int) -> ClipBatch:
        """Clips ``start:stop`` with what they were generated from."""
        return self.take(range(start, min(stop, len(self))))

    def take(self, indices) -> ClipBatch:
        """Clips ``indices``, in that order, with what they were generated from."""
        indices = list(indices)
        return ClipBatch([self.frames[i] for i in indices], [self.prompts[i] for i in indices],
                         [self.images[i] for i in indices], [self.references[i] for i in indices],
                         [self.character_ids[i] for i in indices])

    def sizes(self) -> dict[tuple[int, int], list[int]]:
        """The clips' indices by frame size (height, width), in batch order."""
        out: dict[tuple[int, int], list[int]] = {}
        for i, clip in enumerate(self.frames):
            out.setdefault(tuple(clip.shape[1:3]), []).append(i)
        return out


class RewardDimension(Protocol):
    """Scores a batch of clips: one float per clip (NaN when the clip cannot be scored)."""

    name: str

    def score(self, batch: ClipBatch) -> np.ndarray: ...


_REGISTRY: dict[tuple[str, str], Callable[..., RewardDimension]] = {}


def register(dimension: str, backend: str) -> Callable[[Callable[..., RewardDimension]], Callable[..., RewardDimension]]:
    """Class decorator: make ``backend`` of ``dimension`` buildable by name."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown reward dimension {dimension!r}; expected one of {DIMENSIONS}")

    def decorate(factory: Callable[..., RewardDimension]) -> Callable[..., RewardDimension]:
        _REGISTRY[(dimension, backend)] = factory
        return factory

    return decorate


def backends() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {d: [] for d in DIMENSIONS}
    for dimension, backend in _REGISTRY:
        out[dimension].append(backend)
    return out


def _factory(dimension: str, backend: str) -> Callable[..., RewardDimension]:
    import anisora_ray.reward.classical  # noqa: F401  (these imports register the backends)
    import anisora_ray.reward.synthetic  # noqa: F401

    if (dimension, backend) not in _REGISTRY:  # torch + transformers only when a learned backend is asked for
        import anisora_ray.reward.character  # noqa: F401
        import anisora_ray.reward.learned  # noqa: F401
        import anisora_ray.reward.released  # noqa: F401  (the released AnimeReward scorers)
    try:
        return _REGISTRY[(dimension, backend)]
    except KeyError:
        raise ConfigError(
            f"reward.dimensions.{dimension}.backend = {backend!r}: no such backend; registered: {backends().get(dimension)}"
        ) from None


def check_options(dimension: str, backend: str, options: dict[str, Any]) -> None:
    """Fail early (on the driver) on an unknown backend or option key, naming what is accepted."""
    factory = _factory(dimension, backend)
    unknown = set(options) - accepted_options(factory)
    if unknown:
        raise ConfigError(
            f"reward.dimensions.{dimension}.options: unknown option(s) {sorted(unknown)} for backend {backend!r}; "
            f"accepted: {sorted(accepted_options(factory))}"
        )


def trains_a_head(dimension: str, backend: str) -> bool:
    """Whether the backend has a learned head ``train-reward`` can fit (it takes ``head`` and ``training``)."""
    return {"head", "training"} <= accepted_options(_factory(dimension, backend))


def check_reward_options(reward) -> None:
    """Every weighted dimension's backend and option keys, checked on the driver (``reward``: RewardConfig);
    a backend with a ``check_options(options)`` static method also checks their values there."""
    dimensions = reward.dimensions.as_dict()
    for name, dim in dimensions.items():
        if dim.weight > 0:
            check_options(name, dim.backend, dim.options)
            precheck = getattr(_factory(name, dim.backend), "check_options", None)
            if precheck is not None:
                precheck(dim.options)


def build_dimension(dimension: str, backend: str, **options: Any) -> RewardDimension:
    """Build one dimension's scorer; an unknown backend or option names what exists."""
    check_options(dimension, backend, options)
    return _factory(dimension, backend)(**options)


def accepted_options(factory: Callable[..., Any]) -> set[str]:
    """Keyword names a backend's constructor takes, following ``**options`` up its base classes."""
    names: set[str] = set()
    for cls in getattr(factory, "__mro__", (factory,)):
        init = cls.__init__ if isinstance(cls, type) else cls
        if init is object.__init__:
            break
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names
