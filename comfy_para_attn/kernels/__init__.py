"""Triton attention kernels, each with a pure-torch reference and an SDPA fallback.

    flash_attention(q, k, v, bias=None, scale=None)      # fp16/bf16, head dim 64/128, sm80+
    quantized_attention(q, k, v, bias=None, scale=None)  # int8 QK^T + fp8 PV, sm89+ (Hopper)

Both take q, k, v [B, H, S, D] and an optional additive key bias broadcastable as
[B, 1, 1, Sk] and return (out [B, H, Sq, D] in q's dtype, lse [B, H, Sq] fp32): the local
kernel contract of `comfy_para_attn.attention.local`. Where a kernel cannot run (no triton,
CPU without TRITON_INTERPRET=1, old GPU, unsupported dtype/shape, a failed compile) it
falls back to SDPA (or `fallback=`) and logs the reason once.

Importing this package does not import triton; the kernels load on first use. Each launch
is a torch custom op, so torch.compile sees one opaque node instead of tracing Triton.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _runtime
from ._runtime import AttentionFn, broken_reason, sdpa_attention, triton_import_error
from .reference import attention_reference, quantized_attention_reference

FLASH_MIN_CAPABILITY = (8, 0)  # bf16 mma
QUANTIZED_MIN_CAPABILITY = (8, 9)  # fp8 e4m3 tensor cores (Ada, Hopper)


@torch.library.custom_op("comfy_para_attn_kernels::flash_attention", mutates_args=())
def _flash_attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    from .triton_flash import launch_flash_attention

    return _runtime.launch_or_sdpa("triton", launch_flash_attention, q, k, v, bias, scale)


@torch.library.custom_op("comfy_para_attn_kernels::quantized_attention", mutates_args=())
def _quantized_attention_op(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    from .triton_quantized import launch_quantized_attention

    return _runtime.launch_or_sdpa("triton-fp8", launch_quantized_attention, q, k, v, bias, scale)


@_flash_attention_op.register_fake
@_quantized_attention_op.register_fake
def _attention_shapes(q, k, v, bias, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None,
                    *, fallback: Optional[AttentionFn] = None):
    """Triton flash attention forward; (out, lse)."""
    return _runtime.run_or_fall_back(
        "triton", _flash_attention_op, FLASH_MIN_CAPABILITY, q, k, v, bias, scale, fallback
    )


def quantized_attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None,
                        *, fallback: Optional[AttentionFn] = None):
    """Triton int8/fp8 attention forward; (out, lse). Lower accuracy: opt in per model."""
    return _runtime.run_or_fall_back(
        "triton-fp8", _quantized_attention_op, QUANTIZED_MIN_CAPABILITY, q, k, v, bias, scale, fallback
    )


def fallback_reason(kernel: str, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None) -> Optional[str]:
    """Why `kernel` ("triton" or "triton-fp8") would fall back on these inputs; None if it runs."""
    need = FLASH_MIN_CAPABILITY if kernel == "triton" else QUANTIZED_MIN_CAPABILITY
    return _runtime.unsupported_reason(kernel, q, k, v, bias, need)


__all__ = [
    "attention_reference",
    "broken_reason",
    "fallback_reason",
    "flash_attention",
    "quantized_attention",
    "quantized_attention_reference",
    "sdpa_attention",
    "triton_import_error",
]
