"""The publish directory in /dev/shm: where it is, whether there is room, and cleaning up.

Each controller process writes under its own directory, named by PID namespace and pid
(`controller_dir`), so that directories a killed controller left can be told from live
ones and swept (`sweep_stale_dirs`, `remove_dir_of_dead_controller`). `check_shm_space`
refuses a write that would not fit (in the directory, or in host RAM for tmpfs) with a
`ShmSpaceError` that says how to fix it. `float32_files` / `map_float32`: shared float32
files that several processes fill in place (Parallel VAE Decode's per-rank images).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch

from .errors import ShmSpaceError

logger = logging.getLogger("comfy_para_attn.pool")

DIR_PREFIX = "comfy_para_attn-"
# Room kept free beyond the tensor bytes: zip headers and pickled metadata, plus slack so
# the host does not run its /dev/shm completely dry.
HEADROOM_BYTES = 64 << 20


def shm_root() -> Path:
    """Where tensors are published: $COMFY_PARA_ATTN_SHM_DIR, else /dev/shm, else temp."""
    configured = os.environ.get("COMFY_PARA_ATTN_SHM_DIR")
    if configured:
        return Path(configured)
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


def _host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _is_tmpfs(directory: Path) -> bool:
    """Whether `directory` lives on tmpfs (RAM-backed), by the longest matching mount."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split()[1:3] for line in mounts]
    except OSError:
        return False
    target = str(directory.resolve())
    best = ("", "")
    for mount_point, fs_type in entries:
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) > len(best[0]):
            best = (mount_point, fs_type)
    return best[1] == "tmpfs"


def check_shm_space(required_bytes: int, *, directory: Path | str | None = None,
                    what: str = "tensors") -> None:
    """Raise `ShmSpaceError` saying needed vs available (and how to fix it) when
    `required_bytes` do not fit in the publish directory, or, since tmpfs lives in RAM, in
    the host memory that is still available."""
    directory = Path(directory) if directory is not None else shm_root()
    needed = int(required_bytes) + HEADROOM_BYTES
    stats = os.statvfs(directory)
    free, size = stats.f_bavail * stats.f_frsize, stats.f_blocks * stats.f_frsize
    if needed > free:
        raise ShmSpaceError(
            f"publishing {what} for the worker pool needs {gib(needed)} in {directory}, but only "
            f"{gib(free)} is free (size {gib(size)}). Enlarge it: in Docker start the container "
            f"with --shm-size={max(1, -(-needed // (1 << 30)) + 1)}g (compose: shm_size), or on a "
            f"host run `sudo mount -o remount,size=<N>G /dev/shm`; or set "
            f"COMFY_PARA_ATTN_SHM_DIR to a larger RAM-backed directory.")
    available = _host_available_bytes()
    if available is not None and _is_tmpfs(directory) and needed > available:
        raise ShmSpaceError(
            f"publishing {what} for the worker pool needs {gib(needed)} of host memory in "
            f"{directory} (tmpfs lives in RAM), but only {gib(available)} is available. Free "
            f"host memory (unload other models), add RAM, or use fewer/smaller models.")


_claimed_dirs: set[Path] = set()
_exiting = False


def remove_own_dirs() -> None:
    """At exit: remove this process's publish directories with everything in them. ComfyUI's
    prompt thread is a daemon thread that may be inside a write when the process exits (Ctrl+C
    during a prompt's weight transfer): its file, half or wholly written, goes too, and a write
    finishing after this deletes its own file (`exiting`)."""
    begin_exit()
    for directory in list(_claimed_dirs):
        shutil.rmtree(directory, ignore_errors=True)


def begin_exit() -> None:
    """The process is exiting: writes under way stop at their next chunk and nothing more is
    published (`exiting`)."""
    global _exiting
    _exiting = True


def exiting() -> bool:
    """Whether the process is exiting (`begin_exit` or `remove_own_dirs` ran)."""
    return _exiting


def pid_namespace() -> str:
    """This process's PID namespace (the inode of /proc/self/ns/pid), "0" where unknown. Two
    containers that share /dev/shm (Docker's --ipc=host) can each run ComfyUI as the same pid,
    and a pid seen from one of them says nothing about the other's processes."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return "0"


def controller_dir(pid: int, root: Path | None = None) -> Path:
    """The publish directory of controller `pid` of this PID namespace."""
    return (root or shm_root()) / f"{DIR_PREFIX}{pid_namespace()}-{pid}"


def own_publish_dir(root: Path) -> Path:
    """This process's publish directory under `root`, made (and claimed) at first use;
    refused once the process is exiting (`remove_own_dirs`)."""
    if _exiting:
        raise RuntimeError("not writing to shared memory: this process is exiting")
    directory = controller_dir(os.getpid(), root)
    if directory not in _claimed_dirs:
        # A directory of our pid that this process did not make is a previous program's under
        # the same pid: ComfyUI-Manager restarts ComfyUI with os.execv, which runs no atexit
        # handler, so its files (a whole model) would stay and count against the space check.
        shutil.rmtree(directory, ignore_errors=True)
        _claimed_dirs.add(directory)
    directory.mkdir(mode=0o700, exist_ok=True)
    return directory


def float32_files(shape: tuple[int, ...], count: int, *, what: str) -> list[str]:
    """`count` new float32 files of `shape` in the publish directory, reading as zeros, for
    processes to map with `map_float32` and fill in place (the writer of each reserves its
    pages: `map_float32(..., reserve=True)`). Callers unlink them."""
    nbytes = 4 * math.prod(shape)
    directory = own_publish_dir(shm_root())  # first: it clears what a previous program of our pid left
    check_shm_space(count * nbytes, what=what)
    paths = []
    try:
        for _ in range(count):
            path = directory / f"f32-{uuid.uuid4().hex[:12]}.bin"
            paths.append(str(path))
            with open(path, "wb") as handle:
                os.ftruncate(handle.fileno(), nbytes)  # sparse: no pages yet
    except BaseException:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return paths


def map_float32(path: str, shape: tuple[int, ...], *, reserve: bool = False, what: str = "tensors") -> torch.Tensor:
    """A float32 tensor of `shape` backed by the file `path`, shared with other mappings.
    `reserve`: allocate the file's pages first (as zeros), so that a full tmpfs is a
    ShmSpaceError here rather than a SIGBUS when the mapping is written."""
    if reserve:
        with open(path, "r+b") as handle:
            _reserve(handle.fileno(), 4 * math.prod(shape), what)
    return torch.from_file(path, shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)


def _reserve(fd: int, nbytes: int, what: str) -> None:
    """Allocate `nbytes` (zeros) for the file; a full filesystem is a ShmSpaceError."""
    if nbytes == 0:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise ShmSpaceError(f"no space left in shared memory for {what} ({gib(nbytes)}); free host "
                                f"memory or enlarge /dev/shm") from exc
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise  # a filesystem without fallocate stays sparse


def process_gone(pid: int) -> bool:
    """True when no process `pid` runs (or only its zombie, which holds no files open)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # another user's live process
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[-1][:1] in ("Z", "X")
    except OSError:
        return False


def remove_dir_of_dead_controller(pid: int, root: Path | None = None) -> bool:
    """Remove the publish directory of controller `pid` if that process is gone (True: none is
    left). A controller killed by a signal runs no atexit handler, and its files (a whole
    model) would hold host memory until some later controller swept them. A live process of
    that pid (ComfyUI restarted by exec) is left to claim its directory itself."""
    directory = controller_dir(pid, root)
    if not directory.exists():
        return True  # nothing left (the controller exited normally)
    if not process_gone(pid):
        return False
    shutil.rmtree(directory, ignore_errors=True)
    return True


def sweep_stale_dirs(root: Path | None = None, log: bool = False) -> list[Path]:
    """Remove publish directories left by controllers of this PID namespace that no longer
    run (killed ones), and those named by pid alone (earlier versions); another namespace's
    are left alone (their processes cannot be seen from here). With `log`, say what was freed."""
    root = root or shm_root()
    removed, freed, namespace = [], 0, pid_namespace()
    for entry in root.glob(f"{DIR_PREFIX}*"):
        match = re.fullmatch(re.escape(DIR_PREFIX) + r"(?:(\d+)-)?(\d+)", entry.name)
        if not match or (match.group(1) or namespace) != namespace:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() and entry in _claimed_dirs:
            continue  # ours
        if pid != os.getpid() and not process_gone(pid):
            continue  # its controller still runs
        # (Our pid but not made by this process: a previous program under the same pid, as
        # after ComfyUI-Manager's os.execv restart; see own_publish_dir.)
        freed += sum(f.stat().st_size for f in entry.glob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if log and removed:
        logger.info("removed %d shared-memory folder(s) (%s) left in %s by ComfyUI processes that were killed",
                    len(removed), gib(freed), root)
    return removed
