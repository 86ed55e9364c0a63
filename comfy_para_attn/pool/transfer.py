"""Large tensors for the workers through /dev/shm, and cheap fingerprints to cache them by.

The controller writes a state dict once with `publish_tensors` (each distinct storage's raw
bytes, at aligned offsets, into a per-process directory in /dev/shm; several threads write
at once, GPU storages are copied out on the way) and sends the small `TensorHandle`, which
carries the layout, in a job payload; each worker maps the file with `load_tensors`, so CPU
ranks share the pages (copy-on-write) and CUDA ranks copy straight from them to their GPU.
Views keep sharing their storage, as with torch.save. torch.save itself wrote a 12B model
at 0.66 GiB/s (a CRC32 per record, one thread).
Files go when the handle is released, at interpreter exit, or, after a controller was
killed, when the next controller publishes (stale directories of dead pids are swept).
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import ShmSpaceError

logger = logging.getLogger("comfy_para_attn.pool")

DIR_PREFIX = "comfy_para_attn-"
# Room kept free beyond the tensor bytes: zip headers and pickled metadata, plus slack so
# the host does not run its /dev/shm completely dry.
HEADROOM_BYTES = 64 << 20

_published: dict[str, "TensorHandle"] = {}  # path -> handle, in this (controller) process


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a published file: its storage's byte offset there, plus
    the tensor's dtype, shape, stride and offset (elements) inside that storage."""

    name: str
    dtype: str
    shape: tuple
    stride: tuple
    storage_byte_offset: int
    element_offset: int


@dataclass(frozen=True)
class TensorHandle:
    """A published state dict: small and picklable, sent to workers inside a payload."""

    path: str
    key: str
    nbytes: int
    owner_pid: int
    entries: tuple = ()
    file_bytes: int = 0

    def release(self) -> None:
        release_tensors(self)


def shm_root() -> Path:
    """Where tensors are published: $COMFY_PARA_ATTN_SHM_DIR, else /dev/shm, else temp."""
    configured = os.environ.get("COMFY_PARA_ATTN_SHM_DIR")
    if configured:
        return Path(configured)
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _gib(nbytes: int) -> str:
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
            f"publishing {what} for the worker pool needs {_gib(needed)} in {directory}, but only "
            f"{_gib(free)} is free (size {_gib(size)}). Enlarge it: in Docker start the container "
            f"with --shm-size={max(1, -(-needed // (1 << 30)) + 1)}g (compose: shm_size), or on a "
            f"host run `sudo mount -o remount,size=<N>G /dev/shm`; or set "
            f"COMFY_PARA_ATTN_SHM_DIR to a larger RAM-backed directory.")
    available = _host_available_bytes()
    if available is not None and _is_tmpfs(directory) and needed > available:
        raise ShmSpaceError(
            f"publishing {what} for the worker pool needs {_gib(needed)} of host memory in "
            f"{directory} (tmpfs lives in RAM), but only {_gib(available)} is available. Free "
            f"host memory (unload other models), add RAM, or use fewer/smaller models.")


_claimed_dirs: set[Path] = set()


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


def _controller_dir(root: Path) -> Path:
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
    check_shm_space(count * nbytes, what=what)
    directory = _controller_dir(shm_root())
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
            raise ShmSpaceError(f"no space left in shared memory for {what} ({_gib(nbytes)}); free host "
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
        if pid == os.getpid() or not process_gone(pid):
            continue  # its controller still runs
        freed += sum(f.stat().st_size for f in entry.glob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if log and removed:
        logger.info("removed %d shared-memory folder(s) (%s) left in %s by ComfyUI processes that were killed",
                    len(removed), _gib(freed), root)
    return removed


ALIGNMENT = 64  # bytes; every storage starts at a multiple (any dtype's element size divides it)
WRITE_THREADS = 4


def _storage_identity(storage: torch.UntypedStorage) -> tuple:
    return storage.device, storage.data_ptr(), storage.nbytes()


def _plain(name: str, value) -> torch.Tensor:
    """A dense tensor whose raw bytes mean what it holds (conj/neg views resolved)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"publish_tensors: {name!r} is a {type(value).__name__}, not a tensor")
    if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.is_quantized or \
            value.layout != torch.strided or value.device.type == "meta":
        raise TypeError(f"publish_tensors: {name!r} is a {type(value).__name__} ({value.layout}, "
                        f"{value.device.type}); only dense tensors with data can be published")
    return value.detach().resolve_conj().resolve_neg()


def _uint8_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


# A GPU storage comes to the host in pieces of this size, through one pinned buffer per
# writer thread: a fresh pageable buffer per piece paid page faults and a slower copy.
STAGING_BYTES = 128 << 20
PINNED_STAGING = True  # False: pageable copies (the old way; benchmarks compare the two)


def _pwrite_all(fd: int, data, offset: int) -> None:
    view, written = memoryview(data).cast("B"), 0
    while written < view.nbytes:  # pwrite may write less than asked
        count = os.pwrite(fd, view[written:], offset + written)
        if count <= 0:
            raise OSError(f"pwrite wrote nothing at offset {offset + written}")
        written += count


class _PinnedStaging:
    """The pinned buffers of one publish, one per writer thread; `close()` drops them and
    hands the memory back (torch caches pinned blocks)."""

    def __init__(self):
        self._local = threading.local()
        self.buffers: list[torch.Tensor] = []

    def host(self, piece: torch.Tensor) -> torch.Tensor:
        """`piece` (uint8) on the host: itself on the CPU, else copied into this thread's
        pinned buffer (valid until the thread's next piece)."""
        if piece.device.type == "cpu":
            return piece
        if not PINNED_STAGING or piece.device.type != "cuda":
            return piece.cpu()
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
            self.buffers.append(buffer)
        host = buffer[: piece.numel()]
        host.copy_(piece)  # synchronous: the pwrite reads it next
        return host

    def close(self) -> None:
        if not self.buffers:
            return  # nothing pinned (CPU tensors, or a build without an accelerator)
        self.buffers.clear()
        self._local = threading.local()
        for name in ("_accelerator_emptyHostCache", "_host_emptyCache"):
            empty = getattr(torch._C, name, None)
            if empty is not None:
                empty()
                return


def _write_storage(fd: int, storage: torch.UntypedStorage, offset: int, staging: _PinnedStaging) -> None:
    data = _uint8_view(storage)
    for start in range(0, data.numel(), STAGING_BYTES):
        _pwrite_all(fd, staging.host(data[start: start + STAGING_BYTES]).numpy(), offset + start)


def publish_tensors(state_dict: dict[str, torch.Tensor], key: str, *,
                    directory: Path | str | None = None,
                    on_progress: Callable[[int, int], None] | None = None) -> TensorHandle:
    """Write `state_dict` (name -> tensor) once for every worker to map; returns its handle.

    Checks the space first (`ShmSpaceError` with needed vs available). `on_progress(bytes
    written, total bytes)` is called on this thread as storages finish (FLUX.1-dev: ~20 s).
    Call `handle.release()` when the workers no longer need the file.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    # Layout: each distinct storage once (views share theirs), at aligned offsets.
    storages, offsets, entries, size, nbytes = [], {}, [], 0, 0
    for name, value in state_dict.items():
        tensor = _plain(name, value)
        storage = tensor.untyped_storage()
        identity = _storage_identity(storage)
        if identity not in offsets:
            offsets[identity] = size
            storages.append((storage, size))
            nbytes += storage.nbytes()
            size += -(-storage.nbytes() // ALIGNMENT) * ALIGNMENT
        entries.append(TensorEntry(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape),
                                   tuple(tensor.stride()), offsets[identity], tensor.storage_offset()))
    root = Path(directory) if directory is not None else shm_root()
    sweep_stale_dirs(root)
    check_shm_space(nbytes, directory=root, what=f"{key!r}")
    safe_key = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]
    path = _controller_dir(root) / f"{safe_key}-{uuid.uuid4().hex[:12]}.bin"
    partial = path.with_suffix(".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        staging = _PinnedStaging()
        try:  # pwrite, not a writable mapping: a full tmpfs is an ENOSPC error, not SIGBUS
            os.ftruncate(fd, size)  # the full length (sparse: pages come with the writes)
            with ThreadPoolExecutor(WRITE_THREADS) as pool:  # copies and pwrite release the GIL
                writes = {pool.submit(_write_storage, fd, storage, offset, staging): storage.nbytes()
                          for storage, offset in storages}
                try:
                    written = 0
                    for done in as_completed(writes):
                        done.result()  # a failed write raises here (ENOSPC below)
                        written += writes[done]
                        if on_progress is not None:
                            on_progress(written, nbytes)
                except BaseException:
                    # Cancel (ComfyUI's interrupt raised by the progress hook) or a failed
                    # write: stop now, not after every queued storage (~18 s for FLUX.1-dev).
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        finally:
            os.close(fd)
            staging.close()
        os.replace(partial, path)  # workers never see a half-written file
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # it filled up meanwhile
            raise ShmSpaceError(f"{root} filled up while writing {_gib(nbytes)} for {key!r}") from exc
        raise
    handle = TensorHandle(str(path), key, nbytes, os.getpid(), tuple(entries), size)
    _published[handle.path] = handle
    return handle


def load_tensors(handle: TensorHandle, device="cpu") -> dict[str, torch.Tensor]:
    """Map a published state dict; on CPU the tensors share the file's pages (copy-on-write,
    so writing to one never reaches the file), on another device they are copied there."""
    import mmap

    mapped = None
    if handle.file_bytes:
        with open(handle.path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), handle.file_bytes, access=mmap.ACCESS_COPY)
    ends = sorted({e.storage_byte_offset for e in handle.entries}) + [handle.file_bytes]
    storages = {}  # byte offset -> its own storage over the mapping (each holds the mapping)
    for start, end in zip(ends, ends[1:]):
        storages[start] = (torch.frombuffer(mapped, dtype=torch.uint8, count=end - start, offset=start)
                           if end > start else torch.empty(0, dtype=torch.uint8)).untyped_storage()
    tensors = {}
    for entry in handle.entries:
        dtype = getattr(torch, entry.dtype)
        tensors[entry.name] = torch.empty(0, dtype=dtype).set_(storages[entry.storage_byte_offset],
                                                               entry.element_offset, entry.shape, entry.stride)
    device = torch.device(device)
    if device.type == "cpu":
        return tensors
    return {name: tensor.to(device) for name, tensor in tensors.items()}


def release_tensors(handle: TensorHandle) -> None:
    """Delete a published file (only the publishing process does; workers holding a mapping
    keep their pages until they drop the tensors)."""
    if handle.owner_pid != os.getpid():
        return
    _published.pop(handle.path, None)
    path = Path(handle.path)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()  # the per-process directory, once empty
    except OSError:
        pass


@atexit.register
def release_all_tensors() -> None:
    """Delete every file this process published."""
    for handle in list(_published.values()):
        release_tensors(handle)


def fingerprint_tensors(state_dict: dict[str, torch.Tensor], *, extra=None,
                        samples_per_tensor: int = 256, full: bool = False) -> str:
    """A hex digest identifying a state dict, for caching models in the workers.

    Always hashed: every name, shape and dtype, and `extra` (JSON, e.g. patch settings).
    Data: by default `samples_per_tensor` elements per tensor at fixed pseudo-random
    positions (plus the first and last), gathered on the tensor's own device: a 12B-param
    model takes milliseconds, not the seconds to minutes of reading every byte. The
    tradeoff: a change confined to a few elements can go unseen; whole-tensor changes
    (another checkpoint, a merged LoRA, requantization) change nearly every element and are
    caught. `full=True` hashes every byte, exact but as slow as reading the whole model.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        flat_sample = tensor.reshape(-1) if full else _sample(tensor, samples_per_tensor)
        digest.update(memoryview(flat_sample.contiguous().view(torch.uint8).cpu().numpy()))
    if extra is not None:
        digest.update(json.dumps(extra, sort_keys=True, default=repr).encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1024)
def _sample_positions(numel: int, count: int) -> torch.Tensor:
    """Fixed pseudo-random flat positions for a size (plus the first and last): the same in
    every process and run, so equal tensors give equal fingerprints."""
    generator = torch.Generator().manual_seed(numel)
    positions = torch.randint(0, numel, (count,), generator=generator)
    return torch.cat([positions, torch.tensor([0, numel - 1])])


def _sample(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` elements at positions fixed by the tensor's size, gathered on its device and
    without copying a non-contiguous tensor into a flat one first."""
    numel = tensor.numel()
    if numel <= count:
        return tensor.reshape(-1)
    positions = _sample_positions(numel, count).to(tensor.device)
    if tensor.is_contiguous():
        return tensor.view(-1)[positions]
    coordinates, remainder = [], positions
    for size in reversed(tensor.shape):  # unravel flat positions into per-dimension indices
        coordinates.append(remainder % size)
        remainder = remainder // size
    return tensor[tuple(reversed(coordinates))]
