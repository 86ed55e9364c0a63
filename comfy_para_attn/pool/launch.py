"""Starting worker processes: the layout that defines a pool, each worker's environment,
and the inherited pipes (pass_fds) that connect it to the controller."""
from __future__ import annotations

import hashlib
import os
import pickle
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

from . import protocol
from .errors import PoolStartError

REPO_ROOT = str(Path(__file__).resolve().parents[2])  # makes `comfy_para_attn` importable
# Inherited launcher variables (torchrun) that would contradict the pool's own layout.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
# Our live workers' pids, in the environment because it survives os.execv (ComfyUI-Manager's
# restart): the restarted program reaps them (`reap_previous_workers`), and only them.
WORKER_PIDS_ENV = "COMFY_PARA_ATTN_WORKER_PIDS"


def _recorded() -> list[tuple[int, str]]:
    """(pid, start time) of each recorded worker."""
    pairs = [entry.split(":") for entry in os.environ.get(WORKER_PIDS_ENV, "").split(",") if entry.count(":") == 1]
    return [(int(pid), start) for pid, start in pairs if pid.isdigit()]


def _record(entries) -> None:
    os.environ[WORKER_PIDS_ENV] = ",".join(f"{pid}:{start}" for pid, start in dict(entries).items())


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time in clock ticks since boot) from /proc, zombies included."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return fields[0], int(fields[1]), fields[19]


def remember_worker(pid: int) -> None:
    stat = _stat(pid)
    if stat is not None:
        _record([*_recorded(), (pid, stat[2])])


def forget_worker(pid: int) -> None:
    _record([(p, start) for p, start in _recorded() if p != pid])


def reap_previous_workers() -> list[int]:
    """Reap the workers a previous program under this pid left (ComfyUI restarted by
    os.execv: they exit when their lifeline closes, and nothing else waits for them); returns
    the pids taken care of. Only processes we recorded (pid and start time: a reused pid is
    another process) that are still our children, never another pack's. One still exiting
    is waited for on a daemon thread."""
    mine = []
    for pid, start in _recorded():
        stat = _stat(pid)
        if stat is None or stat[1] != os.getpid() or stat[2] != start:
            continue
        mine.append(pid)
        try:
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True,
                                 name=f"para-attn reap {pid}").start()
        except ChildProcessError:
            pass
    _record([])
    return mine


@dataclass(frozen=True)
class PoolLayout:
    """Everything that needs new processes when it changes (compared by `get_pool`)."""

    world_size: int
    device: str
    gpus: tuple[int, ...] | None
    env: tuple[tuple[str, str], ...]
    sys_path: tuple[str, ...]
    init_digest: str | None

    @classmethod
    def create(cls, world_size, device="cpu", gpus=None, env=None, sys_path=None, init=None):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if device == "cuda":
            gpus = tuple(int(g) for g in (range(world_size) if gpus is None else gpus))
            if len(gpus) != world_size or len(set(gpus)) != len(gpus):
                raise ValueError(f"gpus must name {world_size} distinct GPUs, got {list(gpus)}")
        elif gpus is not None:
            raise ValueError("gpus only applies to device='cuda'")
        if init is not None:
            protocol.parse_job_spec(init[0])
        return cls(
            world_size=int(world_size),
            device=device,
            gpus=gpus,
            env=tuple(sorted((str(k), str(v)) for k, v in (env or {}).items())),
            sys_path=tuple(str(Path(p).resolve()) for p in (sys_path or ())),
            init_digest=None if init is None else hashlib.sha256(pickle.dumps(init)).hexdigest(),
        )


@dataclass
class WorkerProcess:
    """One started worker and the controller's ends of its three pipes."""

    rank: int
    process: subprocess.Popen
    commands: Connection
    events: Connection
    lifeline_fd: int
    events_open: bool = True
    channels_open: bool = True
    _closing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def close_channels(self) -> None:
        """Close the command pipe and the lifeline; the events pipe belongs to the controller's
        reader thread for this worker, which closes it when the worker's end closes. Locked:
        a shutdown from another thread (or at exit) may race a failing job's cleanup, and a
        descriptor closed twice could be one that another thread has just been given."""
        with self._closing:
            if not self.channels_open:
                return
            self.channels_open = False
        self.commands.close()
        os.close(self.lifeline_fd)


HOST_THREADS_ENV = "PARA_ATTN_HOST_THREADS"  # threads for a worker's host-heavy phases


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(layout: PoolLayout, port: int) -> dict[str, str]:
    """The environment shared by all ranks (each rank then adds RANK and its GPU)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and k != WORKER_PIDS_ENV}
    paths = [*import_roots(layout), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE=str(layout.world_size), PYTHONUNBUFFERED="1")
    share = str(max(1, (os.cpu_count() or 1) // layout.world_size))
    # Host-heavy phases (VAE tile blending, see context.host_threads) use the user's
    # OMP_NUM_THREADS or this rank's share of the cores.
    env.setdefault(HOST_THREADS_ENV, env.get("OMP_NUM_THREADS", share))
    if "OMP_NUM_THREADS" not in env:
        # CPU ranks compute on the host: each takes its share of the cores (torch's default of
        # one thread per core would oversubscribe them N times). CUDA ranks sample with one
        # host thread: with cores / ranks each, FLUX ring x2 took 103.3 against 83.5 ms/step
        # (bench_context_parallel.py --worker-threads default,1, 2 H200s, 32 cores).
        env["OMP_NUM_THREADS"] = "1" if layout.device == "cuda" else share
    env.update(dict(layout.env))
    return env


def import_roots(layout: PoolLayout) -> list[str]:
    """The workers' import roots: the layout's first (ComfyUI's folder, whose `nodes` module
    must win over this pack's `nodes/` package), then this pack's."""
    return list(dict.fromkeys([*layout.sys_path, REPO_ROOT]))


def visible_device(layout: PoolLayout, rank: int) -> str:
    """CUDA_VISIBLE_DEVICES for a rank: CPU ranks see no GPU; CUDA ranks see exactly one,
    named through the controller's own CUDA_VISIBLE_DEVICES when it has one."""
    if layout.device == "cpu":
        return ""
    index = layout.gpus[rank]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not visible:
        return str(index)
    names = [name.strip() for name in visible.split(",") if name.strip()]
    if index >= len(names):
        raise PoolStartError(f"GPU index {index} is not among CUDA_VISIBLE_DEVICES={visible}")
    return names[index]


def spawn_worker(layout: PoolLayout, rank: int, env: dict[str, str]) -> WorkerProcess:
    """Start `python -m comfy_para_attn.pool.worker` for one rank with its three pipes
    inherited through pass_fds (not multiprocessing, which would re-run the server's main
    module in the child)."""
    gpu = visible_device(layout, rank)  # may raise: before any pipe is open
    commands_r, commands_w = os.pipe()
    events_r, events_w = os.pipe()
    lifeline_r, lifeline_w = os.pipe()
    child_fds = (commands_r, events_w, lifeline_r)
    config = protocol.WorkerConfig(
        rank=rank, world_size=layout.world_size, device_type=layout.device,
        backend="nccl" if layout.device == "cuda" else "gloo",
        commands_fd=commands_r, events_fd=events_w, lifeline_fd=lifeline_r,
        parent_pid=os.getpid(), sys_path=import_roots(layout))
    env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), CUDA_VISIBLE_DEVICES=gpu)
    relay = output_needs_relay()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "comfy_para_attn.pool.worker", config.to_json()],
            env=env, pass_fds=child_fds, close_fds=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if relay else None, stderr=subprocess.STDOUT if relay else None)
    except BaseException:
        for fd in (commands_w, events_r, lifeline_w):
            os.close(fd)
        raise
    finally:
        for fd in child_fds:  # the child has its copies; ours would hide its EOFs
            os.close(fd)
    remember_worker(process.pid)
    if relay:
        threading.Thread(target=_relay_output, args=(process.stdout,), daemon=True,
                         name=f"para-attn rank {rank} output").start()
    return WorkerProcess(rank, process, Connection(commands_w, readable=False),
                         Connection(events_r, writable=False), lifeline_w)


def output_needs_relay() -> bool:
    """True when this process's `sys.stderr` is not the one Python started with: ComfyUI replaces it
    with a LogInterceptor that keeps what is written for the log panel and the /internal/logs
    endpoint. A worker writing to the inherited descriptor would bypass it (its warnings seen
    in the terminal only), so its output comes through a pipe and is written to `sys.stderr`."""
    return sys.stderr is not sys.__stderr__


def _relay_output(stream) -> None:
    """Copy a worker's output (its stdout and stderr) line by line to `sys.stderr` until the
    worker closes it (exits)."""
    try:
        for line in iter(stream.readline, b""):
            try:
                sys.stderr.write(line.decode(errors="replace"))
                sys.stderr.flush()
            except Exception:  # a closed or broken stderr must not stop the draining
                pass
    finally:
        stream.close()
