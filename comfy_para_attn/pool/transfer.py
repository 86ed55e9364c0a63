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
The directory itself, the space check and the sweeping are `pool.shm`'s.
"""
from __future__ import annotations

import atexit
import errno
import functools
import hashlib
import importlib
import json
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import ShmSpaceError
from .shm import begin_exit, check_shm_space, exiting, gib, own_publish_dir, remove_own_dirs, shm_root, sweep_stale_dirs

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
        if exiting():  # Ctrl+C: the queued storages would hold the exit for the whole write
            raise RuntimeError("not publishing: this process is exiting")
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
    path = own_publish_dir(root) / f"{safe_key}-{uuid.uuid4().hex[:12]}.bin"
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
        if exiting():  # finished after the exit handler cleaned up: handled below
            raise RuntimeError
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if exiting():  # the exit handler ran under the write: nobody else would delete what it left
            path.unlink(missing_ok=True)
            raise RuntimeError("not publishing: this process is exiting") from None
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # it filled up meanwhile
            raise ShmSpaceError(f"{root} filled up while writing {gib(nbytes)} for {key!r}") from exc
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
    keep their pages until they drop the tensors). The per-process directory stays until
    exit: releases also run from garbage collection on any thread, and removing it there
    could pull it from under a write that has just made it."""
    if handle.owner_pid != os.getpid():
        return
    _published.pop(handle.path, None)
    Path(handle.path).unlink(missing_ok=True)


def release_all_tensors() -> None:
    """Delete every file this process published."""
    for handle in list(_published.values()):
        release_tensors(handle)


# At exit the writes stop at their next chunk (`begin_exit`), before concurrent.futures joins its
# worker threads, which runs every queued item first: ~20 s of a FLUX.1-dev write after Ctrl+C.
# threading runs these exit hooks last registered first, and concurrent.futures registers its
# join when its thread module is imported: so import it before registering ours.
importlib.import_module("concurrent.futures.thread")
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(begin_exit)


@atexit.register
def _release_at_exit() -> None:
    """Also the publish directories with whatever else is in them (a write still under way on
    ComfyUI's prompt thread); nothing is published after this."""
    release_all_tensors()
    remove_own_dirs()


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
