"""Stop restarting a GAPO worker group that fails the same way at the same update: a deterministic error.

Ray Train restarts a failed worker group from its last checkpoint up to ``gapo.max_failures`` times (-1: without
limit, what an unattended run sets). An error no restart changes (a bug, a value every attempt meets) fails each
attempt at the same update: every restart costs a model load and the updates since the checkpoint, and without a
limit the run never ends. :class:`RepeatedFailureStop` runs in Ray Train's controller and ends the fit once
``gapo.same_failure_limit`` attempts in a row raised the same error (digits aside) with no progress between them (no
later checkpoint reported: each attempt restarted from the same one). A failure in which a process died (an OOM
kill, a lost node, a preemption: Ray's own errors; the other ranks' collective errors beside it) is left to
``max_failures``, and breaks the streak.
"""

from __future__ import annotations

import re

from ray.exceptions import RayError
from ray.train.v2._internal.exceptions import RayTrainError
from ray.train.v2.api.callback import UserCallback

from anisora_ray.runtime import first_line


class RepeatedFailureError(RuntimeError):
    """The worker group failed ``gapo.same_failure_limit`` times in a row with the same error at the same update."""


def signature(exc: BaseException) -> str:
    """The error's type and message with its numbers masked (ports, addresses, pids change between attempts)."""
    return f"{type(exc).__name__}: " + re.sub(r"0x[0-9a-fA-F]+|\d+", "#", first_line(exc))


def died(exc: BaseException) -> bool:
    """A process that died or stopped answering: Ray's own errors, and how Ray Train's controller hands them over
    (``WorkerHealthCheckFailedError`` carrying the actor's death, ``WorkerHealthCheckTimeoutError``)."""
    return isinstance(exc, RayError | RayTrainError) or hasattr(exc, "health_check_failure")


class RepeatedFailureStop(UserCallback):
    """Raises :class:`RepeatedFailureError` in the controller (Ray Train does not retry a controller's error) when
    ``limit`` attempts in a row failed at the same update with an error in common; 0: never."""

    def __init__(self, limit: int):
        self.limit = limit
        self.step = -1  # the latest update any attempt reported (with a checkpoint: every gapo.checkpoint_every)
        self.streak: tuple[int, set[str]] | None = None  # (update, the errors every attempt of the streak raised)
        self.count = 0

    def after_report(self, run_context, metrics, checkpoint) -> None:
        steps = [int(m["step"]) for m in metrics if isinstance(m, dict) and "step" in m]
        if steps:
            self.step = max(self.step, *steps)

    def after_exception(self, run_context, worker_exceptions: dict[int, BaseException]) -> None:
        raised = dict(worker_exceptions)
        if not self.limit or not raised or any(died(exc) for exc in raised.values()):
            self.streak, self.count = None, 0
            return
        errors = {signature(exc) for exc in raised.values()}
        if self.streak is not None and self.streak[0] == self.step and self.streak[1] & errors:
            self.streak, self.count = (self.step, self.streak[1] & errors), self.count + 1
        else:
            self.streak, self.count = (self.step, errors), 1
        if self.count >= self.limit:
            rank, exc = next((r, e) for r, e in sorted(raised.items()) if signature(e) in self.streak[1])
            after = f"since its checkpoint of update {self.step}" if self.step >= 0 else "before any checkpoint"
            raise RepeatedFailureError(
                f"the GAPO worker group failed {self.count} times in a row {after} with the same error, which a "
                f"restart repeats, so it is not restarted again (gapo.same_failure_limit={self.limit}): rank {rank}: "
                f"{type(exc).__name__}: {first_line(exc)}")
