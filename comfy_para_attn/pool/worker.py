"""One rank of the pool, run as its own module:

    python -m comfy_para_attn.pool.worker '<WorkerConfig as JSON>'

Started by `pool.controller.Pool`, never by hand. The controller sets CUDA_VISIBLE_DEVICES,
MASTER_ADDR/MASTER_PORT, RANK and WORLD_SIZE in the environment, so torch sees one GPU
from its first import. Threads here: the main thread runs jobs; a reader thread receives
commands (so an interrupt arrives while a job runs); a sender thread writes events (so
job code never blocks on the pipe); a watchdog exits the process when the controller dies.
"""
from __future__ import annotations

import faulthandler
import importlib
import logging
import os
import pickle
import queue
import select
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

from . import protocol
from .context import InterruptFlag, WorkerContext
from .errors import JobInterrupted, JobRefused

logger = logging.getLogger("comfy_para_attn.pool")

WATCHDOG_PERIOD_S = 0.5
ORPHAN_EXIT_CODE = 3  # the controller went away; nothing left to serve


_controller_pid: list[int] = []  # set by start_watchdog


def _exit_orphaned(why: str, exit_code: int = ORPHAN_EXIT_CODE) -> None:
    try:
        sys.stderr.write(f"[para-attn worker {os.getpid()}] {why}; exiting\n")
        sys.stderr.flush()
    except Exception:  # stderr may be gone with the controller's terminal
        pass
    try:  # a controller killed by a signal left its published files (a whole model) behind
        from .shm import remove_dir_of_dead_controller

        deadline = time.monotonic() + 2.0  # the lifeline closes as the controller dies; wait out its exit
        while _controller_pid and time.monotonic() < deadline:
            if remove_dir_of_dead_controller(_controller_pid[0]):
                break
            time.sleep(0.1)
    except Exception:
        pass
    os._exit(exit_code)


ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def end_on_signals() -> int:
    """A descriptor that becomes readable (one byte: the signal number) when SIGTERM or SIGHUP
    arrives; call from the main thread. Their default action killed the worker at once, so a
    signal to the whole process group (systemd stopping ComfyUI, a closed terminal) left the
    controller's published model in /dev/shm: now the watchdog ends the worker instead, after
    removing the files of a controller the same signal ended. The C-level handler writes the
    byte while the main thread is still inside a long kernel or collective; the Python handler
    ends the worker too, should a job's library take the wakeup descriptor (asyncio does). A
    signal the controller ignores (SIGHUP under nohup) stays ignored."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    handled = [signum for signum in ENDING_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]
    for signum in handled:
        signal.signal(signum, _end_from_handler)

    def restore_in_child():  # a job's forked child (no exec) must die of these signals as usual
        try:
            signal.set_wakeup_fd(-1)  # else its signals' bytes would end this worker
            for signum in handled:
                signal.signal(signum, signal.SIG_DFL)
        except ValueError:  # not the child's main thread (cannot happen after fork; never fail a fork)
            pass

    os.register_at_fork(after_in_child=restore_in_child)
    return read_fd


def _end_from_handler(signum, _frame) -> None:
    threading.Thread(target=_end_on_signal, args=(bytes([signum]),), name="pool-signal", daemon=True).start()


def start_watchdog(lifeline_fd: int, parent_pid: int, signal_fd: int | None = None) -> None:
    """Exit when the controller dies, even by SIGKILL: the controller never writes to the
    lifeline, so it becomes readable only at EOF, when the controller's end closes. The
    parent-pid check covers a lifeline end leaked into another process by a fork. Also exit
    on a byte from `signal_fd` (`end_on_signals`)."""
    _controller_pid[:] = [parent_pid]

    # poll, not select: select refuses descriptors >= 1024, which a ComfyUI with many open
    # files hands down (the workers keep the controller's descriptor numbers).
    watched = select.poll()
    for fd in (lifeline_fd, signal_fd):
        if fd is not None:
            watched.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def watch():
        while True:
            try:
                for fd, _ in watched.poll(WATCHDOG_PERIOD_S * 1000):
                    if fd == lifeline_fd and os.read(lifeline_fd, 1) == b"":
                        _exit_orphaned("controller closed the lifeline")
                    if fd == signal_fd:
                        _end_on_signal(os.read(signal_fd, 64))
            except Exception as exc:  # noqa: BLE001 - whatever breaks the check, do not outlive the controller
                _exit_orphaned(f"lifeline failed ({exc})")
            if os.getppid() != parent_pid:
                _exit_orphaned(f"controller pid {parent_pid} is gone")

    threading.Thread(target=watch, name="pool-watchdog", daemon=True).start()


def _end_on_signal(received: bytes) -> None:
    """Exit with the shell's code for the first ending signal among `received` (128 + its
    number); other signals' bytes are ignored."""
    for signum in received:
        if signum in ENDING_SIGNALS:
            _exit_orphaned(f"received {signal.Signals(signum).name}", exit_code=128 + signum)


class Outbox:
    """Sends events from one thread. Messages are pickled when posted, so a job that goes on
    changing an object after reporting it cannot change what travels."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._queue: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._send_forever, name="pool-outbox", daemon=True).start()

    def post(self, message) -> None:
        self._queue.put(protocol.encode(message))

    def flush(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _send_forever(self) -> None:
        while True:
            data = self._queue.get()
            try:
                self._conn.send_bytes(data)
            except OSError:  # the controller closed its end: it is gone or tearing down
                _exit_orphaned("controller stopped reading events")
            finally:
                self._queue.task_done()


def resolve_job(spec: str):
    module_name, attribute = protocol.parse_job_spec(spec)
    target = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"job {spec!r} is not callable")
    return target


def failure_message(job_id: int | None, rank: int, exc: BaseException) -> protocol.JobFailed:
    if isinstance(exc, JobRefused):  # an agreed stop: the rank's own failure, or a peer's
        if exc.cause is None:
            return protocol.JobFailed(job_id, rank, "JobRefused", str(exc), "", agreed=True, own=False)
        message = failure_message(job_id, rank, exc.cause)
        message.agreed = True
        # The cause's traceback starts where the agreed step caught it: put the job's frames
        # down to that point (from JobRefused's own traceback) in front.
        caught = traceback.extract_tb(exc.cause.__traceback__)
        outer = traceback.extract_tb(exc.__traceback__)
        if caught:
            outer = outer[:next((i for i, f in enumerate(outer) if f.name == caught[0].name), len(outer))]
        message.traceback = "Traceback (most recent call last):\n" + "".join(
            traceback.format_list(list(outer) + list(caught))) + "".join(
            traceback.format_exception_only(type(exc.cause), exc.cause))
        return message
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError) is matched by name so that this
    # needs no torch import; older torch raised a RuntimeError saying "out of memory".
    out_of_memory = any(cls.__name__ == "OutOfMemoryError" for cls in type(exc).__mro__) or (
        "out of memory" in str(exc).lower()
    )
    return protocol.JobFailed(
        job_id, rank, type(exc).__name__, str(exc), text, out_of_memory=out_of_memory
    )


def join_group(config: protocol.WorkerConfig):
    """Import torch, pick the device, join the process group and prove it with a collective."""
    began = time.monotonic()
    import torch
    import torch.distributed as dist

    imported = time.monotonic()
    if config.device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"rank {config.rank}: no GPU visible with "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}"
            )
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")
    extra = {"device_id": device} if config.backend == "nccl" else {}
    dist.init_process_group(
        config.backend, init_method="env://", rank=config.rank, world_size=config.world_size, **extra
    )
    # One tiny all-reduce proves the group works (and builds NCCL communicators now rather
    # than inside the first job).
    probe = torch.ones(1, device=device)
    dist.all_reduce(probe)
    if int(probe.item()) != config.world_size:
        raise RuntimeError(f"probe all_reduce gave {probe.item()}, expected {config.world_size}")
    joined = time.monotonic()
    return device, {"import_torch_s": imported - began, "join_group_s": joined - imported}


def host_group(config: protocol.WorkerConfig):
    """A gloo group over all ranks for decisions taken on the host (the per-step interrupt
    check): agreeing through NCCL would need a device-to-host copy, a sync that drains the
    GPU's queue at every sampling step. None at world size 1, or where the main group is
    gloo already (the default group serves). Jobs asking `cpu_group()` get the same group."""
    if config.world_size == 1:
        return None
    from ..attention.collectives import cpu_group

    return cpu_group()


class Worker:
    def __init__(self, config: protocol.WorkerConfig, device, outbox: Outbox, cpu_group=None):
        self.config = config
        self.device = device
        self.cpu_group = cpu_group
        self.outbox = outbox
        self.cache: dict = {}
        self.interrupt_flag = InterruptFlag()
        self.jobs: queue.Queue = queue.Queue()

    def read_commands(self, conn: Connection) -> None:
        """Reader thread: interrupts take effect at once; everything else queues for main."""
        while True:
            try:
                message = protocol.recv(conn)
            except (EOFError, OSError):
                _exit_orphaned("controller closed the command pipe")
            except BaseException as exc:  # a job too large to receive (MemoryError): say so, not a silent hang
                self.outbox.post(failure_message(None, self.config.rank, exc))
                self.outbox.flush(5.0)
                _exit_orphaned(f"command reader failed ({type(exc).__name__})")
            if isinstance(message, protocol.Interrupt):
                self.interrupt_flag.job_id = message.job_id
            else:
                self.jobs.put(message)

    def serve(self, commands: Connection) -> None:
        threading.Thread(
            target=self.read_commands, args=(commands,), name="pool-commands", daemon=True
        ).start()
        while True:
            message = self.jobs.get()
            if isinstance(message, protocol.Shutdown):
                break
            self.run(message)
        self.outbox.flush(timeout_s=5.0)
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception:  # exiting anyway; the controller only waits for the exit
            pass

    def run(self, message: protocol.RunJob) -> None:
        rank = self.config.rank
        ctx = WorkerContext(
            rank=rank,
            world_size=self.config.world_size,
            device=self.device,
            cache=self.cache,
            job=message.job,
            job_id=message.job_id,
            post=self.outbox.post,
            interrupt_flag=self.interrupt_flag,
            cpu_group=self.cpu_group,
        )
        try:
            function = resolve_job(message.job)
            payload = pickle.loads(message.payload)
            result = function(ctx, payload)
            reply = protocol.JobDone(
                message.job_id, rank, protocol.encode(result) if rank == 0 else None
            )
        except JobInterrupted:
            reply = protocol.JobInterruptedAck(message.job_id, rank)
        except BaseException as exc:  # every failure, SystemExit included, goes back as text
            reply = failure_message(message.job_id, rank, exc)
        self.outbox.post(reply)


def configure_logging(rank: int) -> None:
    """Worker logs go to stderr with the rank in front: the inherited console, or inside
    ComfyUI a pipe the controller copies into ComfyUI's log capture (`launch.output_needs_relay`);
    WARNING by default so that N workers do not repeat the server's INFO lines."""
    level = os.environ.get("COMFY_PARA_ATTN_WORKER_LOG_LEVEL", "WARNING").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ValueError(f"COMFY_PARA_ATTN_WORKER_LOG_LEVEL={level!r} is no logging level "
                         "(DEBUG, INFO, WARNING, ERROR)")
    handler = logging.StreamHandler(sys.stderr)
    # Its own level: a job that lowers the root level to capture INFO lines for the controller
    # (which logs them itself) must not also print them here, twice over in ComfyUI's log.
    handler.setLevel(level)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [para-attn rank {rank}] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def main(argv: list[str] | None = None) -> None:
    config = protocol.WorkerConfig.from_json((sys.argv[1:] if argv is None else argv)[0])
    start_watchdog(config.lifeline_fd, config.parent_pid, signal_fd=end_on_signals())
    # Ctrl-C in the server's terminal reaches the whole process group; the controller
    # decides what happens to jobs, so workers ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for entry in reversed(config.sys_path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    for fd in (config.commands_fd, config.events_fd, config.lifeline_fd):
        os.set_inheritable(fd, False)  # keep them out of subprocesses that jobs start
    # A crash in native code (a segfault in a kernel or a library) prints every thread's
    # Python stack to the console, where the controller's "killed by SIGSEGV" points.
    faulthandler.enable(all_threads=True)
    outbox = Outbox(Connection(config.events_fd, readable=False))
    try:  # from here on a failure reaches the controller with its traceback
        configure_logging(config.rank)
        device, timings = join_group(config)
        cpu_group = host_group(config)
    except BaseException as exc:
        outbox.post(failure_message(None, config.rank, exc))
        outbox.flush(timeout_s=10.0)
        os._exit(1)
    outbox.post(protocol.Ready(config.rank, os.getpid(), timings))
    Worker(config, device, outbox, cpu_group).serve(Connection(config.commands_fd, writable=False))
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit skips interpreter teardown, where CUDA/NCCL destructors can hang.
    os._exit(0)


if __name__ == "__main__":
    main()
