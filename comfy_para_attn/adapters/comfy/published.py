"""Weights the workers map from shared memory, written once per fingerprint: the diffusion
models for Context Parallel, the VAE for Parallel VAE Decode. Up to `KEEP[kind]` copies of a
kind stay (two diffusion models: Wan 2.2's two experts alternate within every prompt), the
least recently used going first, sooner when /dev/shm has no room for a new one; a copy also
goes when its ComfyUI model is freed (the workers drop theirs at the next write or use of that
kind, or when ComfyUI next makes room for a model of its own), and all go when the ComfyUI
process exits. A model
object is fingerprinted once; its weights are not re-read per prompt. The workers keep the
same models: whenever a copy goes, they drop theirs (`unmap_in_workers`)."""
from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from typing import Callable, Optional

import torch

from ...attention.config import env_int

log = logging.getLogger("comfy_para_attn")

KEEP = {"model": env_int("PARA_ATTN_KEEP_MODELS", 2, minimum=1), "vae": 1}
_published: dict[str, object] = {}  # fingerprint -> pool.transfer.TensorHandle
_recent: dict[str, list[str]] = {}  # label -> fingerprints the workers may hold, least recently used first
_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_users: dict[str, int] = {}  # fingerprint -> live model objects with those weights
_resident: dict[str, tuple[tuple, set]] = {}  # label -> (pool's pids, fingerprints its workers hold)


def mark_resident(pool, label: str, fingerprint: str) -> None:
    """The workers of `pool` hold `label`'s model of `fingerprint` (after a job used it)."""
    pids, held = _resident.get(label, ((), set()))
    if pids != tuple(pool.pids):
        held = set()
    _resident[label] = (tuple(pool.pids), held | {fingerprint})


def is_resident(pool, label: str, fingerprint: str) -> bool:
    pids, held = _resident.get(label, ((), set()))
    return pids == tuple(pool.pids) and fingerprint in held


def _progress_bar():
    """`on_progress` for a write: ComfyUI's progress bar of the running node (the sampler or
    the decode), 0-100%, where ComfyUI's progress hook is set (a server); None elsewhere."""
    try:
        import comfy.utils
    except ImportError:
        return None
    if getattr(comfy.utils, "PROGRESS_BAR_HOOK", None) is None:
        return None
    bar = comfy.utils.ProgressBar(100)
    shown = [-1]

    def update(written: int, total: int) -> None:
        percent = 100 * written // max(1, total)
        if percent != shown[0]:  # one message per percent, not per tensor
            shown[0] = percent
            bar.update_absolute(percent, 100)

    return update


def publish_weights(module: torch.nn.Module, weights: Callable[[], dict], label: str) -> tuple[str, object]:
    """(fingerprint, handle) of `module`'s weights (`weights()` gives the state dict to send).
    A first write shows its progress on the running node's progress bar."""
    from ...pool import transfer

    fingerprint = _fingerprints.get(module)
    handle = _published.get(fingerprint) if fingerprint is not None else None
    if handle is not None and not os.path.exists(handle.path):
        # Another process removed it (a second ComfyUI in another PID namespace sharing
        # /dev/shm took our directory for a dead controller's; systemd's RemoveIPC): the
        # handle would fail every new pool's workers until this model was freed.
        log.warning("%s weights' shared-memory file %s is gone (removed by another process); writing it again",
                    label, handle.path)
        if fingerprint in _recent.get(label, []):
            _evict(label, fingerprint, "(its shared-memory file was removed)")
        else:
            _published.pop(fingerprint, None)
    if fingerprint is None or fingerprint not in _published:
        state = weights()
        fingerprint = transfer.fingerprint_tensors(state, extra={"class": type(module).__name__})
        if module not in _fingerprints:
            _users[fingerprint] = _users.get(fingerprint, 0) + 1
            weakref.finalize(module, _module_gone, fingerprint)
        _fingerprints[module] = fingerprint
        if fingerprint not in _published:
            _write(label, fingerprint, state)
    drop_freed(label)
    recent = _recent.setdefault(label, [])
    if fingerprint in recent:
        recent.remove(fingerprint)
    recent.append(fingerprint)
    return fingerprint, _published[fingerprint]


def drop_freed(label: Optional[str] = None) -> None:
    """Make the workers drop the models (of `label`, or every kind) that ComfyUI has freed:
    their files are released already, but the workers still hold them, in their VRAM and the
    file's pages while they map it. Called at the next write or use of a kind, and when
    ComfyUI makes room for its own models (`memory.install`)."""
    freed = [(kind, f) for kind, recent in _recent.items() if label in (None, kind)
             for f in recent if f not in _published]
    for kind, fingerprint in freed:
        _evict(kind, fingerprint, "(its model was freed)")


def holds_models(pool) -> bool:
    """Whether `pool`'s workers hold a model or VAE that a job of ours gave them."""
    return any(pids == tuple(pool.pids) and held for pids, held in _resident.values())


def _write(label: str, fingerprint: str, state: dict) -> None:
    """Write `state` for the workers, after making room: the least recently used copies of
    `label` beyond `KEEP[label] - 1`, and more while /dev/shm has no room. Unlinking a file
    frees nothing while a worker maps it, so the workers drop each evicted model first."""
    from ...pool import transfer
    from ...pool.errors import ShmSpaceError

    recent = _recent.setdefault(label, [])
    if fingerprint in recent:  # its file was released with its model: the workers may still map it
        _evict(label, fingerprint, "before the new one is written (its old file was released)")
    keep = KEEP.get(label, 1)
    while len(recent) >= keep:
        _evict(label, _victim(recent), f"before the new one is written (to keep {keep})")
    while True:
        try:
            began = time.monotonic()
            handle = transfer.publish_tensors(state, f"{label}-{fingerprint[:16]}", on_progress=_progress_bar())
            break
        except ShmSpaceError:
            if not recent:
                raise
            _evict(label, _victim(recent), "before the new one is written (for room in shared memory)")
    _published[fingerprint] = handle
    log.info("%s weights (%.2f GiB) written to shared memory in %.1f s", label, handle.nbytes / 2**30,
             time.monotonic() - began)


def _victim(recent: list[str]) -> str:
    """What to evict: a model ComfyUI has freed (its file is released already), else the least
    recently used."""
    return next((fingerprint for fingerprint in recent if fingerprint not in _published), recent[0])


def _evict(label: str, fingerprint: str, why: str) -> None:
    _recent[label].remove(fingerprint)
    handle = _published.pop(fingerprint, None)
    if handle is not None:
        handle.release()
    unmap_in_workers(label, why=why, fingerprint=fingerprint)


def withdraw(module: torch.nn.Module, label: str, why: str) -> None:
    """Take `module`'s weights out of shared memory (no worker will use them); a later
    `publish_weights` writes them again."""
    fingerprint = _fingerprints.get(module)
    if fingerprint is not None and fingerprint in _recent.get(label, []):
        _evict(label, fingerprint, why)


def _module_gone(fingerprint: str) -> None:
    """The last model object with these weights was freed (ComfyUI's "Free model and node
    cache", another checkpoint in the loader): its shared-memory copy goes too, as ComfyUI's
    RAM copy did. Workers that still map it keep their pages until they drop the model."""
    _users[fingerprint] -= 1
    if _users[fingerprint] > 0:
        return
    del _users[fingerprint]
    # The fingerprint stays in `_recent`: the workers may still map the file, and drop it when
    # it is evicted (so the next writes of that kind make them drop it).
    labels = [label for label, recent in _recent.items() if fingerprint in recent]
    handle = _published.pop(fingerprint, None)
    if handle is not None:
        handle.release()
        log.info("%s weights released from shared memory (the model was freed)", "/".join(labels) or "model")


def unmap_in_workers(kind: str, why: str, fingerprint: Optional[str] = None) -> int:
    """Make the live pool's workers drop their cached `kind` ("model" / "vae"), only those
    of `fingerprint` if given; returns how many each dropped (0 without a pool). Unlinking a replaced file frees nothing while a
    worker still maps it (any one tensor of it keeps every page: a LoRA's backup of the
    original weight, say), so without this the next model's write failed on a /dev/shm sized
    for one model, on every prompt after. A pool that cannot do it is shut down, which
    unmaps everything."""
    from ...pool import current_pool, shutdown_pool
    from ...pool.errors import WorkerFailure

    pids, held = _resident.pop(kind, ((), set()))
    if fingerprint is not None and held - {fingerprint}:
        _resident[kind] = (pids, held - {fingerprint})
    pool = current_pool()
    if pool is None:
        return 0
    try:
        dropped = pool.run("comfy_para_attn.adapters.comfy.worker_jobs:drop_cached", (kind, fingerprint),
                           timeout_s=120)
    except WorkerFailure as exc:  # failed (pool kept) or broken: start afresh
        log.warning("could not make the workers drop the replaced %s (%s); restarting the pool", kind, exc)
        shutdown_pool()
        return 0
    if dropped:
        log.info("workers dropped their cached %s (%d) %s", kind, dropped, why)
    return dropped


@atexit.register
def release_all() -> None:
    for handle in _published.values():
        handle.release()
    _published.clear()
