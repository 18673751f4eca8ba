"""Connect to Ray: join a cluster (``ray.address``) or start a local one bound to loopback."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from anisora_ray.config import RayConfig
from anisora_ray.errors import InfrastructureError

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Start or join Ray once; a driver that already connected (a test) is kept.

    ``ray.address``, else ``RAY_ADDRESS`` (what a ``ray job submit`` driver gets), is joined; with
    neither, a local Ray bound to loopback is started.
    """
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")  # set for drivers started by `ray job submit`
    if address:
        ray.init(address=address, namespace=cfg.namespace, log_to_driver=cfg.log_to_driver)
        return
    ray.init(
        address="local",  # a new local instance, even when another Ray runs on this machine
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        namespace=cfg.namespace,
        include_dashboard=cfg.include_dashboard,
        dashboard_host=cfg.dashboard_host,
        log_to_driver=cfg.log_to_driver,
        _node_ip_address=cfg.node_ip_address,
    )
    log.info("started a local Ray: %s", ray.cluster_resources())


@contextlib.contextmanager
def train_settings(cfg: RayConfig) -> Iterator[None]:
    """``ray.preemption_watcher`` and ``ray.train_poll_s`` for the ``TorchTrainer.fit()`` inside: Ray Train reads
    them from the driver's environment during ``fit()`` and hands them to its controller; the environment is
    restored afterwards."""
    settings = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1" if cfg.preemption_watcher else "0",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": repr(float(cfg.train_poll_s))}
    before = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)  # a lost node must not take the router down with it
class LeastLoaded:
    """Leases the least-loaded of ``count`` workers (e.g. generator replicas) to callers from many processes;
    lives as long as the worker group, so streaming stages that come and go share one view of the load.

    A worker a call failed on (``release(index, failed=True)``) is leased only when every other one failed within
    ``cooldown_s`` too, until that long has passed or a call on it succeeded: a replica that fails every call
    gets a few calls a cooldown, not its share; one restarted after a crash comes back. ``avoid``: the workers a
    retry must not go to (those its call failed on) while there is another."""

    def __init__(self, count: int, cooldown_s: float = 60.0) -> None:
        self.load = [0] * count
        self.failed_at: list[float | None] = [None] * count
        self.cooldown_s = cooldown_s

    def lease(self, avoid: tuple[int, ...] = ()) -> int:
        now = time.monotonic()
        choices = [i for i in range(len(self.load)) if i not in avoid] or list(range(len(self.load)))

        def recently_failed(i: int) -> bool:
            return self.failed_at[i] is not None and now - self.failed_at[i] < self.cooldown_s

        index = min(choices, key=lambda i: (recently_failed(i), self.load[i]))
        self.load[index] += 1
        return index

    def release(self, index: int, failed: bool | None = False) -> None:
        """``failed``: the call failed on the worker (True), succeeded (False), or says nothing of it (None)."""
        self.load[index] = max(0, self.load[index] - 1)
        if failed is not None:
            self.failed_at[index] = time.monotonic() if failed else None

    def loads(self) -> list[int]:
        return list(self.load)

    def reset(self) -> None:
        """Forget every lease: a stage starts (no lease outlives the stage that took it). A lease whose caller gave up
        waiting for it, was cancelled while leasing or was killed before releasing it counted for the rest of the
        job, and the router sent that replica fewer calls than the others (its GPU idle) round after round."""
        self.load = [0] * len(self.load)


def actor_placement() -> dict:
    """Where the calling actor runs: actor id, node id, the GPU ids Ray gave it, pid."""
    ctx = ray.get_runtime_context()
    return {
        "actor_id": ctx.get_actor_id(),
        "node_id": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "pid": os.getpid(),
    }


def ray_logs_to_file(path: str) -> str:
    """Send the driver-side Ray loggers (``ray``, ``ray.data``, ``ray.train``, ...) to ``path`` instead of
    the terminal, so a job prints its own progress lines and table; returns ``path``. Worker output
    stays in Ray's session logs when ``ray.log_to_driver`` is off."""
    import mlflow  # noqa: F401  (each configures its loggers on import: redirect after that)
    import ray.data  # noqa: F401
    import ray.train  # noqa: F401

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "ray.air", "mlflow", "alembic"):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    return path


def ray_session_logs() -> str | None:
    """The folder of this Ray session's worker logs (None when not known)."""
    try:
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return None


def on_this_node():
    """Scheduling that keeps a small bookkeeping actor on the driver's node: it lives as long as the
    job's driver does, whichever worker node is lost (an actor placed on a lost node would lose its state)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[-1] if text else "")[:300]


RESTART_WAIT_S = 600.0  # a call to a restarting actor waits this long for it, without spending a retry


def call_with_retries(submit: Callable[[], ray.ObjectRef], *, what: str | Callable[[], str], retries: int,
                      timeout_s: float | None = None, on_timeout: Callable[[], None] | None = None,
                      first: ray.ObjectRef | None = None, restart_wait_s: float = RESTART_WAIT_S) -> tuple[Any, int]:
    """``ray.get(submit())``, submitted again after an infrastructure failure: the actor died or is
    restarting (waited for up to ``restart_wait_s``, not counted), the call raised, or it ran past ``timeout_s`` (``on_timeout`` runs first, e.g. kill
    the actor so Ray restarts it). Returns (result, times the call was sent again); after ``retries`` more tries raises
    :class:`InfrastructureError` naming ``what`` and the last error. Content failures must come back
    as values (quarantine records, NaN scores), not as exceptions."""
    last: BaseException | None = None
    ref = first

    def name() -> str:  # ``what`` may change as the call moves (a callable: read when reported)
        return what() if callable(what) else what

    attempt = resent = 0
    restarting_since = None
    while attempt <= retries:
        if ref is None:
            ref = submit()
        try:
            return ray.get(ref, timeout=timeout_s), resent
        except ray.exceptions.ActorUnavailableError as exc:  # restarting: wait for it, this is not a new failure
            restarting_since = restarting_since or time.monotonic()
            if time.monotonic() - restarting_since < restart_wait_s:
                ref, resent = None, resent + 1
                time.sleep(0.5)
                continue
            last = exc
        except ray.exceptions.GetTimeoutError as exc:
            last = exc
            log.warning("%s: no answer within %.0fs (try %d of %d)", name(), timeout_s, attempt + 1, retries + 1)
            if on_timeout is not None:
                on_timeout()
        except Exception as exc:  # noqa: BLE001 - dead actor, unavailable actor, or an error raised by the call
            last = exc
            log.warning("%s failed (try %d of %d): %s: %s", name(), attempt + 1, retries + 1, type(exc).__name__,
                        first_line(exc))
        ref, restarting_since, resent = None, None, resent + 1
        time.sleep(min(5.0, 0.2 * 2**attempt))
        attempt += 1
    raise InfrastructureError(f"{name()} failed {retries + 1} time(s); last error: {type(last).__name__}: "
                              f"{first_line(last)}")
