"""How the controller hears of failed and dead workers, and how it says so.

A reader thread per worker (`read_events`) turns the worker's event pipe into the
controller's queue and marks its end with `EOF`; the controller adds a `Died` pseudo-event
for a worker whose process ended. The rest turns those into text for `PoolError`: which rank
(and GPU) failed or died, how (exit code, signal, the OOM killer), and its traceback.
"""
from __future__ import annotations

import queue
import signal
from dataclasses import dataclass
from typing import Any

from . import protocol
from .errors import PoolError, PoolJobError, breaks_cuda
from .launch import PoolLayout, WorkerProcess


@dataclass
class Died:
    """Pseudo-event: the worker's process ended (returncode None: it closed its pipe)."""

    returncode: int | None


EOF = object()  # a reader thread's last item: its worker closed the event pipe


def read_events(worker: WorkerProcess, inbox: queue.Queue) -> None:
    """Reader thread: every event of one worker into `inbox`, then `EOF`. Reading off the
    controller's thread means a worker that freezes halfway through writing a large event
    (a sampled latent, a traceback) blocks only this thread, never the deadlines."""
    try:
        while True:
            try:
                event = protocol.recv(worker.events)
            except (EOFError, OSError):
                inbox.put((worker.rank, EOF))
                return
            except Exception as exc:  # not unpicklable here: a worker bug, reported to the caller
                event = exc
            inbox.put((worker.rank, event))
    finally:
        # The pipe is this thread's: closed at its end, never under a read still blocked in it
        # (a child of the worker can keep the pipe open past the worker's death).
        worker.events.close()


def describe_death(rank: int, pid: int, returncode: int | None, during: str) -> str:
    if returncode is None:
        return f"rank {rank} (pid {pid}) closed its pipe to the controller {during}"
    if returncode > 128 and returncode - 128 in (signal.SIGTERM, signal.SIGHUP):  # the worker's own exit on them
        return f"rank {rank} (pid {pid}) was ended by {signal.Signals(returncode - 128).name} {during}"
    if returncode >= 0:
        return f"rank {rank} (pid {pid}) exited with code {returncode} {during}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    text = f"rank {rank} (pid {pid}) was killed by {name} (exit code {returncode}) {during}"
    if -returncode == signal.SIGKILL:
        text += "; SIGKILL often means the host ran out of memory (Linux OOM killer, see dmesg)"
    return text


def death_between_jobs(worker: WorkerProcess) -> str:
    return describe_death(worker.rank, worker.process.pid, worker.process.returncode, "between jobs")


def rank_name(rank: int, layout: PoolLayout | None) -> str:
    """"rank 1 (GPU 3)" on a CUDA pool: each worker sees only its own GPU, so torch's own
    messages call every rank's GPU "GPU 0"; the index here is the controller's."""
    if layout is None or layout.device != "cuda" or layout.gpus is None:
        return f"rank {rank}"
    return f"rank {rank} (GPU {layout.gpus[rank]})"


def describe_failure(event: protocol.JobFailed, job: str | None, layout: PoolLayout | None = None) -> str:
    where = f"job {job!r}" if job else "start"
    if event.out_of_memory:
        head = (f"{rank_name(event.rank, layout)} ran out of memory in {where}: {event.error_type}: "
                f"{event.message}")
        if layout is not None and layout.device == "cuda":
            head += ("\n(torch inside a worker calls its GPU 'GPU 0'.) Free memory on that GPU (close other "
                     "programs on it) or ask less of it.")
    else:
        head = f"rank {event.rank} raised {event.error_type} in {where}: {event.message}"
    return f"{head}\n\n--- traceback from rank {event.rank} ---\n{event.traceback.rstrip()}"


def leaves_device_broken(event: protocol.JobFailed) -> bool:
    """A CUDA error other than out of memory (that rank's CUDA context is unusable; see
    context.breaks_the_device, which judges the exception itself), or an error of the process
    group's backend (an NCCL or gloo failure stays with the communicator)."""
    if event.out_of_memory:
        return False
    return (breaks_cuda((event.error_type,), event.message)
            or event.error_type in ("DistBackendError", "DistNetworkError", "DistError")
            or any(mark in event.message for mark in ("NCCL error", "Gloo", "gloo")))


def job_failure_error(events: list[tuple[int, Any]], job: str, pids: list[int], layout: PoolLayout | None,
                       shut_down: bool, note: str = "") -> PoolError:
    """The error for a failed job from what was seen, (rank, `JobFailed` or `Died`) in order:
    a death wins, since it explains why its peers' collectives then failed. `pids`: the
    ranks' processes; `shut_down`: the pool was shut down meanwhile (a death was our kill)."""
    deaths = [(r, e) for r, e in events if isinstance(e, Died)]
    first_rank, first = deaths[0] if deaths else events[0]
    if deaths and shut_down:  # its SIGKILL was ours, not the OOM killer's
        return PoolError(f"job {job!r} was stopped: the pool was shut down while it ran (ComfyUI is "
                         "exiting, or another thread shut it down or replaced it for another layout); the "
                         "next run starts a fresh pool", reason="dead", rank=first_rank, job=job)
    if isinstance(first, Died):
        text = describe_death(first_rank, pids[first_rank], first.returncode, f"during job {job!r}")
        reason, traceback_text = "died", None
    else:
        text = describe_failure(first, job, layout)
        reason = "out_of_memory" if first.out_of_memory else "exception"
        traceback_text = first.traceback
    others = [f"rank {r}: {e.error_type}: {e.message}" for r, e in events
              if isinstance(e, protocol.JobFailed) and e is not first]
    if others:
        text += "\n\nother ranks failed too:\n" + "\n".join(others)
    if note:
        text += f"\n\n{note}"
    return PoolError(f"worker pool failed: {text}\n(the pool was shut down; the next run "
                     "starts a fresh one)", reason=reason, rank=first_rank, job=job,
                     worker_traceback=traceback_text)


def refused_job_error(events: list[tuple[int, protocol.JobFailed]], job: str,
                      layout: PoolLayout | None) -> PoolJobError:
    """The error for a job whose ranks all stopped at an agreed failure (`JobRefused`): the
    failing ranks' messages and the first one's traceback; the pool was kept."""
    own = sorted([(r, e) for r, e in events if e.own] or events, key=lambda item: item[0])
    first_rank, first = own[0]
    text = describe_failure(first, job, layout)
    ending = "\n(every rank stopped there; the worker pool is still running)"
    if not any(e.agreed for _, e in events):  # failed alike outside agreed steps (Pool._settle_failure)
        head, traceback_marker, rest = text.partition("\n\n--- traceback")
        text = (f"{head}\n(every rank failed this job, so the worker pool is still running: most likely the model "
                "cannot take these inputs, as it would fail without Context Parallel, e.g. at this size)"
                f"{traceback_marker}{rest}")
        ending = ""
    others = [f"rank {r}: {e.error_type}: {e.message}" for r, e in own[1:]]
    if others:
        text += "\n\nother ranks failed too:\n" + "\n".join(others)
    return PoolJobError(f"{text}{ending}",
                        reason="out_of_memory" if first.out_of_memory else "exception", rank=first_rank, job=job,
                        worker_traceback=first.traceback or None, error_type=first.error_type)


def dead_pool_error(job: str, worker: WorkerProcess | None) -> PoolError:
    """The error for a run on a pool that was shut down (`worker` None), or whose `worker`
    died between jobs."""
    if worker is None:
        return PoolError("the pool is shut down; use get_pool() for a fresh one",
                         reason="dead", job=job)
    return PoolError("worker pool failed: " + death_between_jobs(worker) +
                     "\n(the pool was shut down; the next run starts a fresh one)",
                     reason="died", rank=worker.rank, job=job)


def unreadable_event_error(rank: int, event: Exception) -> PoolError:
    """The error for an event of `rank` that the reader could not unpickle (`event`)."""
    return PoolError(
        f"worker pool failed: rank {rank} sent a result or progress event this process cannot "
        f"read ({type(event).__name__}: {event}); a job may send only values whose classes the "
        "controller can import\n(the pool was shut down; the next run starts a fresh one)",
        reason="exception", rank=rank)
