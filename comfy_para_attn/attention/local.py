"""The local attention kernel: (out, lse) for one block of queries against one block of keys.

Ring attention needs the log-sum-exp of every partial result to merge them, so the local
kernel returns it. Backends are pluggable: `register_backend(name, fn)` adds one (the
Triton kernels in `kernels/` do), `set_backend(name)` picks it.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

log = logging.getLogger("comfy_para_attn.attention")

LocalKernel = Callable[[Tensor, Tensor, Tensor, Optional[Tensor], Optional[float]], Tuple[Tensor, Tensor]]

_BACKENDS: dict[str, LocalKernel] = {}
_selected = "auto"


def register_backend(name: str, fn: LocalKernel) -> None:
    """Add a kernel `fn(q, k, v, bias, scale) -> (out [B,H,S,D], lse [B,H,S] fp32)`."""
    _BACKENDS[name] = fn


def set_backend(name: str) -> None:
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: auto, {', '.join(sorted(_BACKENDS))}")
    global _selected
    _selected = name


def get_backend() -> str:
    return _selected


def _math(q, k, v, bias, scale):
    """Plain fp32 reference; used where no fused kernel applies."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.to(q.dtype), lse


def _cpu_flash(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=bias, scale=scale
    )
    return out, lse


def _cuda_flash(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
    return out, lse


def _cuda_cudnn(q, k, v, bias, scale):
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, bias, True, 0.0, False, False, scale=scale
    )[:2]
    return out, lse.reshape(out.shape[:-1])


def _cuda_efficient(q, k, v, bias, scale):
    if bias is not None:
        # The efficient kernel wants a dense, aligned bias.
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, False, scale=scale
    )[:2]
    return out, lse[..., : q.shape[2]]  # lse rows are padded to a multiple of 32


register_backend("math", _math)
register_backend("sdpa-cpu-flash", _cpu_flash)
register_backend("sdpa-flash", _cuda_flash)
register_backend("sdpa-cudnn", _cuda_cudnn)
register_backend("sdpa-efficient", _cuda_efficient)


def _auto(q: Tensor, bias: Optional[Tensor]) -> str:
    if q.device.type == "cpu":
        return "sdpa-cpu-flash"
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        if bias is not None:
            return "sdpa-efficient"
        return "sdpa-cudnn" if torch.backends.cudnn.is_available() else "sdpa-flash"
    if q.device.type == "cuda":
        return "sdpa-efficient"
    return "math"


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    """Attention of q [B,H,Sq,D] over k, v [B,H,Sk,D] with an optional additive bias
    broadcastable to [B,H,Sq,Sk]. Returns (out in q's dtype, lse [B,H,Sq] in fp32)."""
    name = _selected if _selected != "auto" else _auto(q, bias)
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
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.full((), very_negative, dtype=dtype, device=mask.device))
    return mask.to(dtype).clamp(min=very_negative)
