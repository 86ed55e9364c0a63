"""What decides whether a Triton kernel may run, and the SDPA fallback when it may not.

Nothing here imports triton at module import: a machine without it still gets the
fallback, with the reason logged once.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

log = logging.getLogger("comfy_para_attn.kernels")

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

AttentionFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], Optional[float]], Tuple[Tensor, Tensor]]

_logged: set = set()
_broken: dict = {}  # kernel name -> reason a launch failed (never retried in this process)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


def device_capability(device) -> tuple:
    """(major, minor) of a CUDA device, asked of the driver once per device: for the kernel
    launches (inside their custom ops, never traced), which ask at every call."""
    index = torch.device(device).index
    return _capability(torch.cuda.current_device() if index is None else index)


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    """None when triton imports, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    """Triton's CPU interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_unusable_reason() -> Optional[str]:
    """Triton decides at import whether its own library functions (tl.max, tl.sum) are
    interpreted: if it was imported before TRITON_INTERPRET=1 was set, kernels cannot run
    on the interpreter in this process."""
    import triton.language.standard as standard

    if type(standard.sum).__name__ != "InterpretedFunction":
        return "triton was imported before TRITON_INTERPRET=1 was set; set it before anything imports triton"
    return None


def log_once(kernel: str, reason: str) -> None:
    if (kernel, reason) not in _logged:
        _logged.add((kernel, reason))
        log.warning("%s attention falls back to SDPA: %s", kernel, reason)


def mark_broken(kernel: str, reason: str) -> None:
    _broken[kernel] = reason


def unsupported_reason(
    kernel: str, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], min_capability: Tuple[int, int]
) -> Optional[str]:
    """Why `kernel` cannot run on these inputs, or None when it can."""
    if kernel in _broken:
        return _broken[kernel]
    missing = triton_import_error()
    if missing:
        return missing
    if q.device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 is set but the tensors are on CUDA"
        capability = torch.cuda.get_device_capability(q.device)  # traced by dynamo: no cache here
        if capability < min_capability:
            return f"GPU capability sm{capability[0]}{capability[1]} is below sm{min_capability[0]}{min_capability[1]}"
    elif not (q.device.type == "cpu" and interpreting()):
        return f"{q.device.type} tensors (set TRITON_INTERPRET=1 to run the kernel on CPU, slowly)"
    elif interpreter_unusable_reason():
        return interpreter_unusable_reason()
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q={q.dtype} k={k.dtype} v={v.dtype}; need one of fp16/bf16 for all three"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be [B, H, S, D]"
    batch, heads, _, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS or k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        return f"head dim {head_dim} (k {k.shape[-1]}, v {v.shape[-1]}); supported: {SUPPORTED_HEAD_DIMS}"
    if k.shape[:2] != (batch, heads) or v.shape != k.shape:
        return f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} in batch and heads"
    if k.shape[2] == 0 or q.shape[2] == 0:
        return "empty sequence"
    if bias is not None:
        if bias.dim() != 4 or bias.shape[1] != 1 or bias.shape[2] != 1 or bias.shape[0] not in (1, batch) \
                or bias.shape[3] != k.shape[2]:
            return f"bias {tuple(bias.shape)} is not a key bias [B or 1, 1, 1, {k.shape[2]}]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            return f"{name} has a non-unit stride in the head dim"
    return None


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None):
    """(out, lse fp32) from PyTorch's SDPA kernels, or fp32 math where none applies."""
    if q.device.type == "cuda" and q.dtype in SUPPORTED_DTYPES:
        if bias is None:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
            return out, lse.float()
        dense_bias = bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, dense_bias, True, 0.0, False, scale=scale
        )[:2]
        return out, lse[..., : q.shape[2]].float()  # lse rows are padded to a multiple of 32
    if q.device.type == "cpu" and q.dtype in SUPPORTED_DTYPES + (torch.float32,):
        mask = None if bias is None else bias.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=mask, scale=scale
        )
        return out, lse.float()
    return math_attention(q, k, v, bias, scale)


def math_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None):
    """fp32 attention written out: the reference everything is measured against."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.to(q.dtype), lse


def run_or_fall_back(
    kernel: str,
    launch: AttentionFn,
    min_capability: Tuple[int, int],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    scale: Optional[float],
    fallback: Optional[AttentionFn],
):
    """Run `launch` where it can run; otherwise `fallback` (default: SDPA), logging why once."""
    fallback = fallback or sdpa_attention
    reason = unsupported_reason(kernel, q, k, v, bias, min_capability)
    if reason is not None:
        log_once(kernel, reason)
        return fallback(q, k, v, bias, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return launch(q, k, v, bias, scale)  # a custom op: a failure inside it falls back there


def launch_or_sdpa(kernel: str, launch: AttentionFn, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                   scale: float):
    """The custom ops' body: a compile or launch failure on a GPU marks the kernel broken (never
    tried again in this process) and answers with SDPA. Here, inside the op, because a compiled
    graph calls the op directly: `run_or_fall_back`'s checks ran only while it was traced."""
    try:
        return launch(q, k, v, bias, scale)
    except Exception as exc:
        if q.device.type != "cuda":
            raise  # on the interpreter a failure is a bug in the kernel: show it
        reason = f"the kernel failed to compile or launch ({type(exc).__name__}: {exc})"
        mark_broken(kernel, reason)
        log_once(kernel, reason)
        out, lse = sdpa_attention(q, k, v, bias, scale)
        return out.contiguous(), lse.float().contiguous()


def broken_reason(kernel: str) -> Optional[str]:
    """Why `kernel` failed to launch in this process, or None."""
    return _broken.get(kernel)
