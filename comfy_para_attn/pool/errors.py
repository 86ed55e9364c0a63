"""Exceptions of the worker pool.

`PoolError` means the pool failed and has been torn down: the next `get_pool()` starts a
fresh one. `PoolInterrupted` is not a failure: the job stopped on request and the pool is
still usable, which is why it is not a `PoolError`; nor is `PoolJobError`, a job that failed
where every rank agreed to stop (`WorkerContext.run_agreed`), which leaves the pool usable.
"""
from __future__ import annotations

import copy
from typing import Iterable


class WorkerFailure(RuntimeError):
    """What a failure in the workers carries, for callers that want more than the message:
    `reason` is one of "exception", "out_of_memory", "died", "timeout", "start", "dead" (a
    run on a pool that was shut down, or a job whose pool was shut down while it ran; a
    start that ran out of time is a `PoolStartError` with reason "timeout");
    `rank` is the failing rank (None when not one rank); `worker_traceback` is the worker's
    own traceback text when it could send one; `job` is the "module:function" that ran.
    Raised as `PoolError` (the pool was shut down) or `PoolJobError` (it was kept).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "exception",
        rank: int | None = None,
        job: str | None = None,
        worker_traceback: str | None = None,
    ):
        super().__init__(message)
        self.reason = reason
        self.rank = rank
        self.job = job
        self.worker_traceback = worker_traceback


class PoolError(WorkerFailure):
    """A worker raised, died, hung or ran out of memory; the pool has been shut down."""


class PoolStartError(PoolError):
    """The workers could not start, join the process group, or run the `init` function."""

    def __init__(self, message: str, **kwargs):
        kwargs.setdefault("reason", "start")
        super().__init__(message, **kwargs)


class PoolJobError(WorkerFailure):
    """The job failed in a part its ranks ran as agreed steps (`WorkerContext.run_agreed`,
    `check_interrupt(failed=...)`), or failed on every rank alike (a model error) and a
    collective over the group completed after it: every rank stopped, no collective was left
    half-done, and the pool is still running (its workers keep their cached models).
    `error_type` is the failing rank's exception class name."""

    def __init__(self, message: str, *, error_type: str = "", **kwargs):
        super().__init__(message, **kwargs)
        self.error_type = error_type


class JobRefused(Exception):
    """Raised inside a job on every rank at once when an agreed step failed on any of them
    (`WorkerContext.run_agreed`); `cause` is this rank's own exception, None where another
    rank failed. Let it propagate out of the job: the controller raises `PoolJobError` and
    keeps the pool."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class PoolInterrupted(RuntimeError):
    """The job stopped because the caller asked (`should_interrupt`); the pool stays usable.
    Also a start stopped that way, or by `shutdown()` from another thread (the process exits)."""


class JobInterrupted(Exception):
    """Raised inside a job by `ctx.check_interrupt()` on every rank at the same step.

    Let it propagate out of the job function: the worker reports it as an acknowledged
    interrupt, not as a failure.
    """


class ShmSpaceError(RuntimeError):
    """Not enough room in /dev/shm (or host memory) to publish tensors for the workers."""


def with_hint(error: BaseException, hint: str) -> BaseException:
    """A copy of `error` (same class and attributes) whose message ends with `hint`: what the
    caller's user can do, which the pool cannot know (raise it `from error`)."""
    hinted = copy.copy(error)
    hinted.args = (f"{error}\n{hint}",)
    return hinted


def breaks_cuda(type_names: Iterable[str], message: str) -> bool:
    """Whether an error (its class and base class names, its message) is a CUDA error other than
    out of memory (an illegal address, a device-side assert): it leaves the process's CUDA
    context unusable."""
    names = set(type_names)
    return "OutOfMemoryError" not in names and ("AcceleratorError" in names or "CUDA error" in message)

