"""The local attention kernel: (out, lse) for one block of queries against one block of keys.

Ring attention needs the log-sum-exp of every partial result to merge them, so the local
kernel returns it. Backends are pluggable: `register_backend(name, fn)` adds one (the
Triton kernels in `comfy_para_attn/kernels/` do), `set_backend(name)` picks it.

Nodes call `select_backend(name)` with one of `BACKEND_CHOICES`: "sdpa" is PyTorch's
kernels, "triton" / "triton-fp8" the kernels in `comfy_para_attn/kernels/` (each falls back to SDPA, saying
why once, where it cannot run), and "auto" is SDPA unless `calibrate_auto()` (run by
`select_backend("auto")` on a GPU) measured a Triton kernel to be both accurate and faster.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..kernels._runtime import math_attention

log = logging.getLogger("comfy_para_attn.attention")

LocalKernel = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], Optional[float]], Tuple[Tensor, Tensor]]

_BACKENDS: dict[str, LocalKernel] = {}
_selected = "auto"
BACKEND_CHOICES = ("auto", "sdpa", "triton", "triton-fp8")
# (device index, dtype, head dim, has bias) -> backend that calibration proved fastest and accurate
_auto_preferences: dict = {}
_calibrations: dict = {}  # same key -> (winner, reports): calibrate once per process


def register_backend(name: str, fn: LocalKernel) -> None:
    """Add a kernel `fn(q, k, v, bias, scale) -> (out [B,H,S,D], lse [B,H,S] fp32)`."""
    _BACKENDS[name] = fn


def set_backend(name: str) -> None:
    if name not in ("auto", "sdpa") and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, sdpa, {', '.join(sorted(_BACKENDS))}")
    global _selected
    _selected = name


def get_backend() -> str:
    return _selected


def _cpu_flash(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    return out, lse


def _cuda_flash(q, k, v, bias, scale):
    if bias is not None:  # the flash kernel takes no bias: the efficient one does
        return _cuda_efficient(q, k, v, bias, scale)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _cuda_cudnn(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias, True, 0.0, False, False, scale=scale
    )[:2]
    return out, lse.reshape(out.shape[:-1])


def _cuda_efficient(q, k, v, bias, scale):
    if bias is not None:
        # The efficient kernel wants the bias's rows 16-byte aligned: pad the key dimension
        # of the storage to a multiple of 16 and view the first k.shape[2] columns (as
        # PyTorch's own SDPA does); then expand to the full shape.
        keys = k.shape[2]
        if keys % 16:
            bias = torch.nn.functional.pad(bias, (0, 16 - keys % 16))[..., :keys]
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], keys)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, False, scale=scale
    )[:2]
    return out, lse[..., : q.shape[2]]  # lse rows are padded to a multiple of 32


register_backend("math", math_attention)  # plain fp32, where no fused kernel applies
register_backend("sdpa-cpu-flash", _cpu_flash)
register_backend("sdpa-flash", _cuda_flash)
register_backend("sdpa-cudnn", _cuda_cudnn)
register_backend("sdpa-efficient", _cuda_efficient)


# Read once at import: on CUDA builds `cudnn.is_available()` is a Python call that
# torch.compile cannot trace (a graph break in every attention call).
_CUDNN_AVAILABLE = torch.backends.cudnn.is_available()


def _sdpa_choice(q: Tensor, bias: Optional[Tensor]) -> str:
    """PyTorch's kernel for these inputs (the behaviour of "auto" before calibration)."""
    if q.device.type == "cpu":
        return "sdpa-cpu-flash"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        if q.shape[-1] % 8:  # cuDNN and the efficient kernel want head dims in multiples of 8
            return "math"
        if bias is not None:
            return "sdpa-efficient"
        return "sdpa-cudnn" if _CUDNN_AVAILABLE else "sdpa-flash"
    if q.device.type == "cuda":
        return "sdpa-efficient"
    return "math"


def _auto(q: Tensor, bias: Optional[Tensor]) -> str:
    if q.device.type == "cuda" and _auto_preferences:
        preferred = _auto_preferences.get((q.device.index, q.dtype, q.shape[-1], bias is not None))
        if preferred is not None:
            return preferred
    return _sdpa_choice(q, bias)


def _sdpa(q, k, v, bias, scale):
    return _BACKENDS[_sdpa_choice(q, bias)](q, k, v, bias, scale)


def _refuse_fallback(q, k, v, bias, scale):
    raise RuntimeError("the kernel would fall back to SDPA here")


def _register_kernel_backends() -> None:
    """Register the Triton kernels (importing `comfy_para_attn.kernels` does not import triton)."""
    from .. import kernels

    register_backend("triton", functools.partial(kernels.flash_attention, fallback=_sdpa))
    register_backend("triton-fp8", functools.partial(kernels.quantized_attention, fallback=_sdpa))


_register_kernel_backends()


def calibrate_auto(device=None, dtypes=(torch.bfloat16,), head_dims=(128,), with_bias=(False, True)) -> dict:
    """Measure, on this GPU, which backend "auto" should use for each (dtype, head dim,
    bias): the fastest of the SDPA choice and the Triton kernel among those that meet the
    accuracy bar. Returns {key: (winner, reports)}; does nothing without CUDA or triton."""
    if not torch.cuda.is_available() or "triton" not in _BACKENDS:
        return {}
    from comfy_para_attn import kernels
    from comfy_para_attn.kernels.selection import fastest_accurate

    if kernels.triton_import_error():
        log.info("auto attention stays on SDPA: %s", kernels.triton_import_error())
        return {}
    device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
    results = {}
    for dtype in dtypes:
        for head_dim in head_dims:
            for has_bias in with_bias:
                key = (device.index, dtype, head_dim, has_bias)
                if key in _calibrations:
                    results[key] = _calibrations[key]
                    continue
                probe = torch.empty(1, 1, 1, head_dim, dtype=dtype, device=device)
                probe_bias = probe[..., :1] if has_bias else None
                candidates = {
                    _sdpa_choice(probe, probe_bias): _sdpa,
                    "triton": functools.partial(kernels.flash_attention, fallback=_refuse_fallback),
                }
                winner, reports = fastest_accurate(
                    candidates, dtype=dtype, head_dim=head_dim, with_bias=has_bias, device=device
                )
                if winner == "triton" and kernels.broken_reason("triton") is None:  # (else SDPA was timed)
                    _auto_preferences[key] = "triton"
                else:
                    _auto_preferences.pop(key, None)
                results[key] = _calibrations[key] = (winner, reports)
    return results


def select_backend(name: str, **calibration) -> str:
    """The node-facing switch: one of BACKEND_CHOICES. "auto" on a GPU calibrates first
    (once per process and key; `calibration` goes to `calibrate_auto`)."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend must be one of {BACKEND_CHOICES}, got {name!r}")
    if name == "auto" and torch.cuda.is_available():
        calibrate_auto(**calibration)
    set_backend(name)
    return name


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Attention of q [B,H,Sq,D] over k, v [B,H,Sk,D] with an optional additive bias
    broadcastable to [B,H,Sq,Sk]. Returns (out in q's dtype, lse [B,H,Sq] in fp32).
    `backend`: one of BACKEND_CHOICES for this call (default: the process-wide selection)."""
    name = backend or _selected
    if name == "auto":
        name = _auto(q, bias)
    elif name == "sdpa":
        name = _sdpa_choice(q, bias)
    out, lse = _BACKENDS[name](q, k, v, bias, scale)
    return out, lse.float()


def key_padding_bias(mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Turn a key mask into an additive bias [B, 1, 1, S] in `dtype`.

    Accepts a bool mask (True = attend) or an additive float mask, shaped [B, S] or
    [B, 1, 1, S]. Masked keys get a large *finite* negative value rather than -inf, so a
    block whose keys are all masked yields a finite lse far below the others and drops out
    of the log-sum-exp merge instead of producing NaN.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        raise ValueError(f"expected a key mask shaped [B, S] or [B, 1, 1, S], got {tuple(mask.shape)}")
    very_negative = -0.5 * torch.finfo(dtype).max
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        # A tokenizer's 0/1 int64 mask would otherwise be a +0/+1 bias that masks nothing.
        raise TypeError(f"the mask must be bool (True = attend) or an additive float bias, not {mask.dtype}; "
                        "for a 0/1 attention mask pass mask.bool()")
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full((), very_negative, dtype=dtype, device=mask.device))
    return mask.to(dtype).clamp(min=very_negative)
