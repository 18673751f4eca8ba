"""Exception types of anisora-ray; each names the item (key, file, prompt) at fault."""

from __future__ import annotations


class AnisoraError(Exception):
    """Base class of every error anisora-ray raises on purpose."""


class ConfigError(AnisoraError, ValueError):
    """A config file or override is invalid; the message names key, value and expectation."""


def check_all(*checks) -> None:
    """Run every check; one ConfigError saying each that failed (a cluster job's user fixes them in one go instead
    of one resubmission each)."""
    said = []
    for check in checks:
        try:
            check()
        except ConfigError as exc:
            said.append(str(exc))
    if len(said) == 1:
        raise ConfigError(said[0])
    if said:
        raise ConfigError(f"{len(said)} things to fix before the job can start:\n" + "\n".join(f"- {s}" for s in said))


class StorageError(ConfigError):
    """Some nodes of the cluster do not see the output folder the driver sees."""


class ManifestError(AnisoraError, ValueError):
    """A prompt manifest is missing columns, has bad rows or cannot be read."""


class VideoDecodeError(AnisoraError):
    """A video file is empty, truncated, corrupt or not a video at all."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"cannot decode video {uri!r}: {reason}")


class VideoGeometryError(AnisoraError, ValueError):
    """A video decodes but has another frame count or size than the run's geometry."""

    def __init__(self, uri: str, got: tuple[int, ...], expected: tuple[int, ...], what: str):
        self.uri = uri
        self.reason = f"{'x'.join(map(str, got))} frames x height x width, {what} is {'x'.join(map(str, expected))}"
        super().__init__(f"video {uri!r} is {self.reason}")


class ImageLoadError(AnisoraError):
    """A first-frame image is missing or unreadable."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        self.reason = reason
        super().__init__(f"cannot load image {uri!r}: {reason}")


class ReplicaError(AnisoraError, RuntimeError):
    """A generator replica failed or reports an unexpected state."""


class WeightsError(AnisoraError, RuntimeError):
    """A weights file or transfer is unusable, or a replica did not load the weights it was sent."""


class InfrastructureError(AnisoraError, RuntimeError):
    """A component (replica, reward actor, worker) kept failing after its restarts and retries.

    Not a verdict on the content: the items it was working on are left for ``--resume``."""


class CacheDriftError(AnisoraError, RuntimeError):
    """The cache audit showed ``generator.cache`` moving the pairs (``min_same_pair``, ``min_signal_kept``) with
    ``on_moved_pairs: stop``.

    Raised before the next round; the state is saved, so ``--resume`` continues once the cache is changed."""


class DiskSpaceError(AnisoraError, OSError):
    """The disk of ``run.output_dir`` has less free space than the next round needs (``run.free_space``).

    Raised before the round writes anything; its state is saved, so ``--resume`` continues once there is room."""
