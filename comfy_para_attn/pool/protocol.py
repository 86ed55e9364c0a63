"""Messages between the controller and its workers, and how they travel.

Each worker has three inherited pipes: commands (controller -> worker), events
(worker -> controller) and a lifeline the controller never writes to (its EOF tells the
worker that the controller died). Messages are pickled dataclasses sent as whole frames
over `multiprocessing.connection.Connection`.

Why `pickle.dumps` and not `Connection.send`: once torch is imported it registers
shared-memory reducers with multiprocessing's ForkingPickler, which `Connection.send`
uses; a tensor would then travel as a shared-memory file descriptor passed over a Unix
socket (or a CUDA IPC handle). Plain pickle copies the bytes through the pipe, which is
what we want for small messages; large tensors go through `pool.transfer` instead.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

# -- controller -> worker ------------------------------------------------------------------


@dataclass
class RunJob:
    """Call `job` ("module:function") as fn(ctx, payload) on every rank.

    The payload stays pickled until the worker's main thread runs the job, so a payload
    that cannot be unpickled there (a missing module) becomes a job failure with a
    traceback instead of killing the worker's reader thread. It travels as its own frame
    after this header (`frames`, `recv`): pickled inside the header, a large payload was
    copied once more on each side.
    """

    job_id: int
    job: str
    payload: bytes | None


@dataclass
class Interrupt:
    """Ask the ranks to stop `job_id` at their next `ctx.check_interrupt()`."""

    job_id: int


@dataclass
class Shutdown:
    """Leave the process group and exit."""


# -- worker -> controller ------------------------------------------------------------------


@dataclass
class Ready:
    """The worker joined the process group; `timings` are seconds spent per start phase."""

    rank: int
    pid: int
    timings: dict = field(default_factory=dict)


@dataclass
class Progress:
    """Rank 0 finished `step` of `total`; `extra` is whatever the job added."""

    job_id: int
    step: int
    total: int
    extra: dict = field(default_factory=dict)


@dataclass
class Heartbeat:
    """Rank 0 is alive and busy (a long step with nothing to count, such as a load)."""

    job_id: int


@dataclass
class JobDone:
    """The rank finished; `result` is rank 0's pickled return value (None elsewhere)."""

    job_id: int
    rank: int
    result: bytes | None


@dataclass
class JobInterruptedAck:
    """The rank stopped the job at an agreed interrupt check."""

    job_id: int
    rank: int


@dataclass
class JobFailed:
    """The rank raised. `job_id` is None when the failure happened during start. `agreed`:
    every rank stopped at the same agreed step (`JobRefused`), so the pool survives; `own`:
    this rank's own failure (False: it stopped because another rank failed)."""

    job_id: int | None
    rank: int
    error_type: str
    message: str
    traceback: str
    out_of_memory: bool = False
    agreed: bool = False
    own: bool = True


# -- worker start configuration (travels as JSON in argv, before anything is unpickled) ----


@dataclass
class WorkerConfig:
    rank: int
    world_size: int
    device_type: str  # "cpu" or "cuda"
    backend: str  # "gloo" or "nccl"; the rendezvous address is in MASTER_ADDR/MASTER_PORT
    commands_fd: int
    events_fd: int
    lifeline_fd: int
    parent_pid: int
    sys_path: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        return cls(**json.loads(text))


# -- transport -----------------------------------------------------------------------------


def parse_job_spec(spec: str) -> tuple[str, str]:
    """Split "package.module:function" (the function may be dotted: "module:Class.method")."""
    module, sep, attribute = spec.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"job must be given as 'module:function', got {spec!r}")
    return module, attribute


class Pickled(bytes):
    """A payload its caller pickled already (with `pickle.HIGHEST_PROTOCOL`): `encode`
    passes it through as it is (no copy), so a large payload is not pickled twice."""


def encode(message: Any) -> bytes:
    if isinstance(message, Pickled):
        return message
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def frames(message: Any) -> list[bytes]:
    """What `message` travels as: a RunJob's header, then its payload bytes as they are."""
    if isinstance(message, RunJob) and message.payload is not None:
        return [encode(RunJob(message.job_id, message.job, None)), message.payload]
    return [encode(message)]


def send(conn: Connection, message: Any) -> None:
    for frame in frames(message):
        conn.send_bytes(frame)


def recv(conn: Connection) -> Any:
    """One message; raises EOFError when the other side closed its end."""
    message = pickle.loads(conn.recv_bytes())
    if isinstance(message, RunJob) and message.payload is None:
        message.payload = conn.recv_bytes()
    return message
