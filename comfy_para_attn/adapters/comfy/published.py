"""Weights the workers map from shared memory: written once per fingerprint and kept until
the ComfyUI process exits (the diffusion model for Context Parallel, the VAE for Parallel
VAE Decode). A model object is fingerprinted once; its weights are not re-read per prompt."""
from __future__ import annotations

import atexit
import logging
import time
import weakref
from typing import Callable

import torch

log = logging.getLogger("comfy_para_attn")

_published: dict[str, object] = {}  # fingerprint -> pool.transfer.TensorHandle
_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def publish_weights(module: torch.nn.Module, weights: Callable[[], dict], label: str) -> tuple[str, object]:
    """(fingerprint, handle) of `module`'s weights (`weights()` gives the state dict to send)."""
    from ...pool import transfer

    fingerprint = _fingerprints.get(module)
    if fingerprint is None or fingerprint not in _published:
        state = weights()
        fingerprint = transfer.fingerprint_tensors(state, extra={"class": type(module).__name__})
        _fingerprints[module] = fingerprint
        if fingerprint not in _published:
            began = time.monotonic()
            handle = transfer.publish_tensors(state, f"{label}-{fingerprint[:16]}")
            _published[fingerprint] = handle
            log.info("%s weights (%.2f GiB) written to shared memory in %.1f s", label, handle.nbytes / 2**30,
                     time.monotonic() - began)
    return fingerprint, _published[fingerprint]


@atexit.register
def release_all() -> None:
    for handle in _published.values():
        handle.release()
    _published.clear()
