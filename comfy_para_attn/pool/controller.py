"""Controller side of the pool: starts the worker processes, runs jobs on them, and turns
every failure into a `PoolError` within seconds.

The controller (the ComfyUI process) never joins a collective and never waits without a
deadline: a reader thread per worker turns its event pipe into a queue, the controller polls
that queue with a short timeout, checks that each worker process is alive, and enforces a
deadline on silence for every job.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import pickle
import queue
import subprocess
import threading
import time
from typing import Any, Callable

from . import protocol
from .errors import PoolError, PoolInterrupted, PoolStartError
from .failures import (EOF, Died, dead_pool_error, death_between_jobs, describe_death, describe_failure,
                       job_failure_error, leaves_device_broken, read_events, refused_job_error,
                       unreadable_event_error)
from .launch import PoolLayout, WorkerProcess, forget_worker, free_port, spawn_worker, worker_env

logger = logging.getLogger("comfy_para_attn.pool")
# A payload this large was almost always an accident (Compile Model's compiled blocks once
# rode along and pickled a whole 12B model per prompt); the job still runs.
LARGE_PAYLOAD_BYTES = 256 << 20

POLL_S = 0.1
INIT_MIN_TIMEOUT_S = 60.0  # the init job's time limit at least, whatever the start left
FAILURE_GRACE_S = 0.5  # after one rank fails, look this long for a rank that died meanwhile
SAME_FAILURE_WAIT_S = 2.0  # ... and this long for the others to fail the same job (see _settle_failure)
GROUP_CHECK_JOB = "comfy_para_attn.pool.context:group_check"
GROUP_CHECK_TIMEOUT_S = 10.0  # a healthy group answers in milliseconds
REAP_TIMEOUT_S = 5.0
EOF_AFTER_DEATH_S = 1.0  # how long a dead worker's reader may take to deliver what is left

_live_pools: set["Pool"] = set()  # strong refs: every started pool is shut down at exit


class Pool:
    """`world_size` worker processes joined in a torch.distributed group (gloo on CPU, NCCL
    on CUDA, one GPU per worker), which run jobs given as "module:function" strings.

    `gpus` are indices into the controller's visible GPUs (default 0..world_size-1). `env`
    adds environment variables to every worker; `sys_path` adds import paths (for example
    the ComfyUI directory). `init=("module:function", payload)` runs once on every rank
    after the group is up, like a job; its failure is a `PoolStartError` with the traceback.
    `should_interrupt()` is polled while the workers start: when true, they are killed and
    `PoolInterrupted` is raised. Linux only (inherited pipe descriptors).
    """

    def __init__(
        self,
        world_size: int,
        *,
        device: str = "cpu",
        gpus=None,
        env: dict | None = None,
        init: tuple[str, Any] | None = None,
        sys_path=None,
        start_timeout_s: float = 120.0,
        should_interrupt: Callable[[], bool] | None = None,
    ):
        if os.name != "posix":
            raise PoolStartError("the worker pool needs Linux (inherited pipe descriptors)")
        self.layout = PoolLayout.create(world_size, device, gpus, env, sys_path, init)
        self._workers: list[WorkerProcess] = []
        self._readers: list[threading.Thread] = []
        self._inbox: queue.Queue = queue.Queue()
        self._alive = False
        self._shut_down = False  # by shutdown(): a job that then loses its workers says so
        self._running_job: int | None = None  # the id of the job being run, for shutdown()
        self._run_lock = threading.Lock()
        # One message's frames at a time on the pipes: shutdown() from another thread (exit)
        # while a job's payload is written would otherwise put its frames inside the payload's.
        self._send_lock = threading.Lock()
        self._job_ids = itertools.count(1)
        self.start_seconds: float | None = None
        began = time.monotonic()
        _live_pools.add(self)
        try:
            timings = self._start_with_retry(began + start_timeout_s, start_timeout_s, should_interrupt)
            if init is not None:  # its own floor: a slow process start must not leave it a second
                *_, refused = self._run(init[0], protocol.encode(init[1]),  # a failed start ends the pool anyway
                                        max(INIT_MIN_TIMEOUT_S, began + start_timeout_s - time.monotonic()), None, None,
                                        settle=False)
                if refused:
                    error = refused_job_error(refused, init[0], self.layout)
                    raise PoolStartError(f"pool init failed: {str(error).rsplit(chr(10), 1)[0]}", rank=error.rank,
                                         job=init[0], worker_traceback=error.worker_traceback)
            if self._shut_down:  # the init job stopped as an interrupt, or the workers came up and read Shutdown
                raise PoolInterrupted("the pool was shut down while it started")
        except PoolError as exc:
            self._terminate()
            if self._shut_down:  # by shutdown() from another thread: the process exits (Ctrl-C), no failure
                raise PoolInterrupted("the pool was shut down while it started") from exc
            if isinstance(exc, PoolStartError):
                raise
            raise PoolStartError(f"pool init failed: {exc}", rank=exc.rank, job=exc.job,
                                 worker_traceback=exc.worker_traceback,
                                 reason="timeout" if exc.reason == "timeout" else "start") from exc
        except BaseException:
            self._terminate()
            raise
        self.start_seconds = time.monotonic() - began
        slowest = {k: max(t.get(k, 0.0) for t in timings) for k in ("import_torch_s", "join_group_s")}
        logger.info(
            "worker pool started: %d %s rank(s), pids %s, in %.1f s (slowest rank: import torch "
            "%.1f s, join group %.1f s)", world_size, device, self.pids, self.start_seconds,
            slowest["import_torch_s"], slowest["join_group_s"])

    # -- public ---------------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        return [worker.process.pid for worker in self._workers]

    @property
    def returncodes(self) -> list[int | None]:
        """Each worker's exit status (None while it runs; negative: killed by that signal)."""
        return [worker.process.poll() for worker in self._workers]

    @property
    def busy(self) -> bool:
        """A job is running (a `run` from inside one, e.g. from its progress callback, would wait for it)."""
        return self._run_lock.locked()

    @property
    def alive(self) -> bool:
        """Started, not shut down, no failure seen, and every worker process still running."""
        return self._alive and all(w.process.poll() is None for w in self._workers)

    def run(
        self,
        job: str,
        payload: Any = None,
        *,
        timeout_s: float,
        on_progress: Callable[[int, int, dict], None] | None = None,
        should_interrupt: Callable[[], bool] | None = None,
    ) -> Any:
        """Run `fn(ctx, payload)` on every rank and return rank 0's result.

        `timeout_s` is a deadline on silence: the job is hung when no event (progress,
        heartbeat, result) arrives for that long. `on_progress(step, total, extra)` is called
        in this thread for rank 0's reports. `should_interrupt()` is polled while waiting;
        when true, the ranks stop at their next `ctx.check_interrupt()` and this raises
        `PoolInterrupted`. An exception from either callback also interrupts the job and is
        re-raised once the ranks stopped. In both cases the pool stays usable, as it does after
        a failure inside the job's agreed steps (`ctx.run_agreed`), which raises `PoolJobError`.
        Every other failure raises `PoolError` and shuts the pool down. Jobs should return CPU tensors
        (a CUDA tensor would be rebuilt on the controller's GPU).
        """
        protocol.parse_job_spec(job)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        payload_bytes = protocol.encode(payload)  # an unpicklable payload leaves the pool alone
        if len(payload_bytes) > LARGE_PAYLOAD_BYTES:
            logger.warning(
                "worker pool: job %r sends %.0f MiB through the pipe to each of %d ranks; large tensors "
                "belong in shared memory (pool.transfer.publish_tensors), not in the payload",
                job, len(payload_bytes) / 2**20, self.layout.world_size)
        if not self._run_lock.acquire(timeout=timeout_s):
            raise RuntimeError("Pool.run: another job is still running on this pool")
        try:
            result, stopped, caller_error, refused = self._run(
                job, payload_bytes, timeout_s, on_progress, should_interrupt)
        finally:
            self._run_lock.release()
        if caller_error is not None:
            raise caller_error
        if refused:
            raise refused_job_error(refused, job, self.layout)
        if stopped:
            raise PoolInterrupted(f"job {job!r} was interrupted; all ranks stopped at the same step")
        return pickle.loads(result)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the workers to exit, wait up to `timeout_s`, then kill what is left."""
        self._shut_down = True
        if self._alive:
            self._alive = False
            try:
                running = self._running_job
                if running is not None:  # stop it at its next step: then the workers read Shutdown
                    self._send_all(protocol.Interrupt(running), timeout_s)
                self._send_all(protocol.Shutdown(), timeout_s)
            except PoolError:
                pass  # a worker is already gone; the rest are killed below
            deadline = time.monotonic() + timeout_s
            for worker in self._workers:
                try:
                    worker.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    logger.warning("rank %d did not exit within %.0f s; killing it",
                                   worker.rank, timeout_s)
        self._terminate()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return (f"Pool(world_size={self.layout.world_size}, device={self.layout.device!r}, "
                f"{state}, pids={self.pids})")

    # -- start ----------------------------------------------------------------------------

    def _start_with_retry(self, deadline: float, timeout_s: float, should_interrupt) -> list[dict]:
        try:
            return self._start(deadline, timeout_s, should_interrupt)
        except PoolStartError as exc:
            # The free port can be taken between choosing it and binding it: try once more.
            if "address already in use" not in str(exc).lower() or self._shut_down:
                raise
            logger.warning("rendezvous port was taken; starting the pool again")
            self._terminate()
            self._workers, self._readers = [], []
            _live_pools.add(self)
            return self._start(deadline, timeout_s, should_interrupt)

    def _start(self, deadline: float, timeout_s: float, should_interrupt) -> list[dict]:
        env = worker_env(self.layout, free_port())
        self._inbox = queue.Queue()  # a retry's workers reuse ranks: none of the old events
        for rank in range(self.layout.world_size):
            worker = spawn_worker(self.layout, rank, env)
            self._workers.append(worker)
            reader = threading.Thread(target=read_events, args=(worker, self._inbox),
                                      name=f"pool-events-r{rank}", daemon=True)
            reader.start()
            self._readers.append(reader)
        self._alive = True
        ready: dict[int, dict] = {}
        while len(ready) < self.layout.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolStartError(
                    f"workers did not start within {timeout_s:g} s (ready ranks: {sorted(ready)})", reason="timeout")
            if should_interrupt is not None and should_interrupt():  # the workers are killed on the way out
                raise PoolInterrupted("the pool's start was interrupted on request")
            if self._shut_down:  # by another thread (the process exits): no need to wait for the workers
                raise PoolInterrupted("the pool was shut down while it started")
            for rank, event in self._poll_events(min(POLL_S, remaining)):
                if isinstance(event, protocol.Ready):
                    ready[rank] = event.timings
                elif isinstance(event, protocol.JobFailed):
                    raise PoolStartError(describe_failure(event, None, self.layout), rank=rank,
                                         worker_traceback=event.traceback)
                elif isinstance(event, Died):
                    pid = self._workers[rank].process.pid
                    raise PoolStartError(describe_death(
                        rank, pid, event.returncode, "while starting (its output is in the console)"),
                        rank=rank)
        return list(ready.values())

    # -- jobs -----------------------------------------------------------------------------

    def _run(self, job, payload_bytes, timeout_s, on_progress, should_interrupt, settle: bool = True):
        """Returns (rank 0's pickled result, stopped by interrupt, caller's exception, the
        ranks' `JobFailed` of an agreed stop) once every rank is idle again; raises PoolError
        (after tearing down) otherwise."""
        if not self.alive:
            raise self._dead_error(job)
        job_id = next(self._job_ids)
        settled = False
        self._running_job = job_id
        try:
            self._send_all(protocol.RunJob(job_id, job, payload_bytes), timeout_s)
            outcome = self._await_job(job_id, job, timeout_s, on_progress, should_interrupt, settle)
            settled = True
            return outcome
        finally:
            self._running_job = None
            if not settled:  # PoolError, or the caller's thread interrupted mid-wait
                self._terminate()

    def _await_job(self, job_id, job, timeout_s, on_progress, should_interrupt, settle: bool = True):
        """`settle`: a failure outside an agreed step may keep the pool (`_settle_failure`);
        off for the group check that decides it."""
        pending = set(range(self.layout.world_size))
        result, stopped, interrupt_sent, caller_error = None, False, False, None
        refused: list[tuple[int, protocol.JobFailed]] = []  # ranks that stopped at an agreed failure
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise PoolError(
                    f"worker pool failed: job {job!r} sent nothing for {timeout_s:g} s "
                    f"(timeout_s={timeout_s:g}) and is considered hung (waiting for ranks "
                    f"{sorted(pending)}); the pool was shut down.",  # (jobs report progress or heartbeats)
                    reason="timeout", job=job)
            batch = self._poll_events(POLL_S)
            for index, (rank, event) in enumerate(batch):
                if isinstance(event, protocol.JobFailed) and event.agreed and event.job_id == job_id:
                    refused.append((rank, event))
                    pending.discard(rank)
                    deadline = time.monotonic() + timeout_s
                    continue
                if isinstance(event, protocol.JobFailed) and event.job_id == job_id and settle and not refused:
                    failed = self._settle_failure(rank, event, job_id, job, pending, batch[index + 1:])
                    return None, False, caller_error, failed
                if isinstance(event, (protocol.JobFailed, Died)):
                    raise self._failure(rank, event, job)
                if getattr(event, "job_id", job_id) != job_id:
                    continue  # stale event from an earlier job
                if isinstance(event, protocol.Progress) and on_progress and caller_error is None:
                    try:
                        on_progress(event.step, event.total, event.extra)
                    except BaseException as exc:  # e.g. ComfyUI's interrupt, raised by its hook
                        caller_error = exc
                elif isinstance(event, protocol.JobDone):
                    pending.discard(rank)
                    if rank == 0:
                        result = event.result
                elif isinstance(event, protocol.JobInterruptedAck):
                    pending.discard(rank)
                    stopped = True
                # Counted from after the callback: time spent in it is not the job's silence.
                deadline = time.monotonic() + timeout_s
            if pending and not interrupt_sent:
                if caller_error is None and should_interrupt is not None:
                    try:
                        stop = bool(should_interrupt())
                    except BaseException as exc:
                        caller_error, stop = exc, True
                else:
                    stop = caller_error is not None
                if stop:
                    self._send_all(protocol.Interrupt(job_id), max(1.0, deadline - time.monotonic()))
                    interrupt_sent = True
        if refused and len(refused) < self.layout.world_size:  # cannot happen when every rank agrees
            raise self._failure(*refused[0], job)
        return result, stopped or interrupt_sent, caller_error, refused

    def _died_idle(self) -> WorkerProcess | None:
        """A worker that died between jobs (the host's OOM killer, say) of a pool that was
        never shut down nor failed a job."""
        if self._alive:
            return next((w for w in self._workers if w.process.poll() is not None), None)
        return None

    def idle_death(self) -> str | None:
        """Why the pool is not alive although it was never shut down nor failed a job, as
        `describe_death` says it."""
        worker = self._died_idle()
        return None if worker is None else death_between_jobs(worker)

    def _dead_error(self, job: str) -> PoolError:
        """The error for a run on a pool that was shut down, or whose worker died idle."""
        worker = self._died_idle()
        self._terminate()
        return dead_pool_error(job, worker)

    def _settle_failure(self, rank: int, event: protocol.JobFailed, job_id: int, job: str, pending: set,
                        taken: list) -> list:
        """A rank failed outside an agreed step (`taken`: the rest of the events polled with
        it). When every other pending rank ends the same job within SAME_FAILURE_WAIT_S (a model
        error fails all ranks alike: a size the model cannot take), none with an error that
        breaks its device or process group, and the group check then completes (see
        context.group_check), the ranks are idle and in step: the pool is kept and the failures
        returned (the job fails with PoolJobError). Otherwise raises the failure; the pool is
        torn down."""
        events = [(rank, event)]
        waiting = set(pending) - {rank}
        deadline = time.monotonic() + SAME_FAILURE_WAIT_S
        batch = list(taken)
        while True:
            for other, seen in batch:
                if isinstance(seen, Died):
                    raise self._failure(*events[0], job, seen=events[1:] + [(other, seen)])
                if getattr(seen, "job_id", None) != job_id:
                    continue
                if isinstance(seen, protocol.JobFailed):
                    events.append((other, seen))
                if isinstance(seen, (protocol.JobFailed, protocol.JobDone, protocol.JobInterruptedAck)):
                    waiting.discard(other)
            if not waiting or time.monotonic() >= deadline:
                break
            batch = self._poll_events(POLL_S / 2)
        if waiting:
            raise self._failure(*events[0], job, seen=events[1:], note=(
                f"Rank(s) {', '.join(map(str, sorted(waiting)))} did not end the job within {SAME_FAILURE_WAIT_S:g} s "
                "of that failure (most likely waiting in a collective for the failed rank), so the pool could not "
                "be kept."))
        if any(leaves_device_broken(e) for _, e in events):
            raise self._failure(*events[0], job, seen=events[1:], note=(
                "A CUDA or process-group error leaves a worker unusable, so the pool could not be kept."))
        check_id = next(self._job_ids)
        try:
            self._send_all(protocol.RunJob(check_id, GROUP_CHECK_JOB, protocol.encode(None)), GROUP_CHECK_TIMEOUT_S)
            checked = self._await_job(check_id, GROUP_CHECK_JOB, GROUP_CHECK_TIMEOUT_S, None, None, settle=False)
            in_step = not (checked[1] or checked[3]) and pickle.loads(checked[0]) is True
            why = "" if in_step else f"it answered {checked[1:]!r}"
        except PoolError as exc:
            in_step, why = False, str(exc)
        if not in_step or self._shut_down:
            if not in_step:
                logger.warning("after job %r failed on every rank, the check of the process groups failed (%s); "
                               "ending the pool", job, why.splitlines()[0] if why else "?")
            raise job_failure_error(events, job, self.pids, self.layout, self._shut_down)
        logger.info("job %r failed on every rank; the process groups check out, so the pool is kept", job)
        return events

    def _failure(self, rank: int, event, job: str, seen: list | None = None, note: str = "") -> PoolError:
        """Build the error for a failed job (`seen`: other ranks' events already taken). A rank
        that died explains why its peers' collectives then failed, so a death seen within the
        grace period wins."""
        events = [(rank, event)] + list(seen or ())
        if isinstance(event, protocol.JobFailed):
            grace_end = time.monotonic() + FAILURE_GRACE_S
            while time.monotonic() < grace_end and not any(isinstance(e, Died) for _, e in events):
                events += [(r, e) for r, e in self._poll_events(0.05)
                           if isinstance(e, (protocol.JobFailed, Died))]
        return job_failure_error(events, job, self.pids, self.layout, self._shut_down, note)

    # -- plumbing -------------------------------------------------------------------------

    def _poll_events(self, timeout_s: float) -> list[tuple[int, Any]]:
        """Events that arrived within `timeout_s`, plus a `Died` for each worker whose
        process ended (after what it sent before dying)."""
        events = self._take_events(timeout_s)
        for worker in self._workers:
            if worker.events_open and worker.process.poll() is None:
                continue
            deadline = time.monotonic() + EOF_AFTER_DEATH_S
            while worker.events_open and time.monotonic() < deadline:  # its last words first
                events += self._take_events(0.05)
            try:  # EOF comes with the exit; give the exit status a moment to appear
                returncode = worker.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                returncode = None
            events.append((worker.rank, Died(returncode)))
        return events

    def _take_events(self, timeout_s: float) -> list[tuple[int, Any]]:
        """What the reader threads delivered within `timeout_s` (at least one item, or none
        at the timeout); an `EOF` marks its worker's pipe closed."""
        items = []
        try:
            items.append(self._inbox.get(timeout=timeout_s))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        events = []
        for rank, event in items:
            if event is EOF:
                self._workers[rank].events_open = False
            elif isinstance(event, Exception):  # the reader could not unpickle what the worker sent
                raise unreadable_event_error(rank, event) from event
            else:
                events.append((rank, event))
        return events

    def _send_all(self, message, timeout_s: float) -> None:
        """Send one message to every rank; the pipe write runs in a helper thread so that a
        frozen worker with a full pipe cannot block the controller past `timeout_s`."""
        data = protocol.frames(message)
        broken: list[int] = []

        def send():
            with self._send_lock:
                for worker in self._workers:
                    try:
                        for frame in data:
                            worker.commands.send_bytes(frame)
                    except OSError:
                        broken.append(worker.rank)

        sender = threading.Thread(target=send, name="pool-send", daemon=True)
        sender.start()
        sender.join(timeout_s)
        if sender.is_alive():
            raise PoolError(f"could not deliver {type(message).__name__} to the workers within "
                            f"{timeout_s:g} s", reason="timeout")
        if broken:
            worker = self._workers[broken[0]]
            try:
                returncode = worker.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                returncode = None
            raise PoolError("worker pool failed: " + describe_death(
                worker.rank, worker.process.pid, returncode, f"(sending {type(message).__name__})"),
                reason="died", rank=worker.rank)

    def _terminate(self) -> None:
        """Kill and reap every worker and close every descriptor; idempotent."""
        self._alive = False
        for worker in self._workers:
            if worker.process.poll() is None:
                try:
                    worker.process.kill()
                except OSError:
                    pass
        for worker in self._workers:
            try:
                worker.process.wait(REAP_TIMEOUT_S)
                forget_worker(worker.process.pid)
            except subprocess.TimeoutExpired:
                logger.error("rank %d (pid %d) survived SIGKILL", worker.rank, worker.process.pid)
        deadline = time.monotonic() + EOF_AFTER_DEATH_S
        for index, worker in enumerate(self._workers):
            if not worker.channels_open:
                continue
            if index < len(self._readers):  # the exit ends the reader, which closes the events pipe
                self._readers[index].join(max(0.0, deadline - time.monotonic()))
            else:  # its reader never started
                worker.events.close()
            worker.close_channels()
        _live_pools.discard(self)


@atexit.register
def _shutdown_live_pools() -> None:
    for pool in list(_live_pools):
        pool.shutdown(timeout_s=3.0)
