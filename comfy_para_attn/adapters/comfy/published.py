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
        _fingerprints[module] = fingerprint
        if fingerprint not in _published:
            # Workers keep one model per kind and have mapped the old file already (unlinking
            # keeps their mapping valid); holding every model ever used would fill /dev/shm.
            old = _latest.get(label)
            if old is not None and old in _published:
                _published.pop(old).release()
                unmap_in_workers(label)
            began = time.monotonic()
            handle = transfer.publish_tensors(state, f"{label}-{fingerprint[:16]}", on_progress=_progress_bar())
            _published[fingerprint] = handle
            _latest[label] = fingerprint
            log.info("%s weights (%.2f GiB) written to shared memory in %.1f s", label, handle.nbytes / 2**30,
                     time.monotonic() - began)
    return fingerprint, _published[fingerprint]


def unmap_in_workers(kind: str) -> int:
    """Make the live pool's workers drop their cached `kind` ("model" / "vae"); returns how
    many each dropped (0 without a pool). Unlinking a replaced file frees nothing while a
    worker still maps it (any one tensor of it keeps every page: a LoRA's backup of the
    original weight, say), so without this the next model's write failed on a /dev/shm sized
    for one model, on every prompt after. A pool that cannot do it is shut down, which
    unmaps everything."""
    from ...pool import PoolError, current_pool, shutdown_pool

    pool = current_pool()
    if pool is None:
        return 0
    try:
        dropped = pool.run("comfy_para_attn.adapters.comfy.worker_jobs:drop_cached", kind, timeout_s=120)
    except PoolError as exc:
        log.warning("could not make the workers drop the replaced %s (%s); restarting the pool", kind, exc)
        shutdown_pool()
        return 0
    log.info("workers dropped their cached %s (%d) before the new one is written", kind, dropped)
    return dropped


@atexit.register
def release_all() -> None:
    for handle in _published.values():
        handle.release()
    _published.clear()
