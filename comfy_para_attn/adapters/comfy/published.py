"""Weights the workers map from shared memory, written once per fingerprint: the diffusion
model for Context Parallel, the VAE for Parallel VAE Decode. A file stays until another model
of the same kind replaces it or the ComfyUI process exits. A model object is fingerprinted
once; its weights are not re-read per prompt."""
from __future__ import annotations

import atexit
import logging
import time
import weakref
from typing import Callable

import torch

log = logging.getLogger("comfy_para_attn")

_published: dict[str, object] = {}  # fingerprint -> pool.transfer.TensorHandle
_latest: dict[str, str] = {}  # label -> fingerprint: one copy per label in /dev/shm
_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_users: dict[str, int] = {}  # fingerprint -> live model objects with those weights
_resident: dict[str, tuple[tuple, str]] = {}  # label -> (pool's pids, fingerprint) its workers hold


def mark_resident(pool, label: str, fingerprint: str) -> None:
    """The workers of `pool` hold `label`'s model of `fingerprint` (after a job used it)."""
    _resident[label] = (tuple(pool.pids), fingerprint)


def is_resident(pool, label: str, fingerprint: str) -> bool:
    return _resident.get(label) == (tuple(pool.pids), fingerprint)


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
    if fingerprint is None or fingerprint not in _published:
        state = weights()
        fingerprint = transfer.fingerprint_tensors(state, extra={"class": type(module).__name__})
        if module not in _fingerprints:
            _users[fingerprint] = _users.get(fingerprint, 0) + 1
            weakref.finalize(module, _module_gone, fingerprint)
        _fingerprints[module] = fingerprint
        if fingerprint not in _published:
            # Workers keep one model per kind and have mapped the old file already (unlinking
            # keeps their mapping valid); holding every model ever used would fill /dev/shm.
            # A file released when its model was freed may still be mapped by the workers, even
            # one of these very weights: they drop it too, or /dev/shm would hold two copies.
            old = _latest.get(label)
            if old is not None:
                if old in _published:
                    _published.pop(old).release()
                unmap_in_workers(label, why="before the new one is written")
            began = time.monotonic()
            handle = transfer.publish_tensors(state, f"{label}-{fingerprint[:16]}", on_progress=_progress_bar())
            _published[fingerprint] = handle
            _latest[label] = fingerprint
            log.info("%s weights (%.2f GiB) written to shared memory in %.1f s", label, handle.nbytes / 2**30,
                     time.monotonic() - began)
    return fingerprint, _published[fingerprint]


def _module_gone(fingerprint: str) -> None:
    """The last model object with these weights was freed (ComfyUI's "Free model and node
    cache", another checkpoint in the loader): its shared-memory copy goes too, as ComfyUI's
    RAM copy did. Workers that still map it keep their pages until they drop the model."""
    _users[fingerprint] -= 1
    if _users[fingerprint] > 0:
        return
    del _users[fingerprint]
    labels = [label for label, latest in _latest.items() if latest == fingerprint]
    handle = _published.pop(fingerprint, None)
    if handle is not None:
        handle.release()
        log.info("%s weights released from shared memory (the model was freed)", "/".join(labels) or "model")


def unmap_in_workers(kind: str, why: str) -> int:
    """Make the live pool's workers drop their cached `kind` ("model" / "vae"); returns how
    many each dropped (0 without a pool). Unlinking a replaced file frees nothing while a
    worker still maps it (any one tensor of it keeps every page: a LoRA's backup of the
    original weight, say), so without this the next model's write failed on a /dev/shm sized
    for one model, on every prompt after. A pool that cannot do it is shut down, which
    unmaps everything."""
    from ...pool import PoolError, current_pool, shutdown_pool

    _resident.pop(kind, None)
    pool = current_pool()
    if pool is None:
        return 0
    try:
        dropped = pool.run("comfy_para_attn.adapters.comfy.worker_jobs:drop_cached", kind, timeout_s=120)
    except PoolError as exc:
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
