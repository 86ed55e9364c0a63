"""A linear layer with 8-bit weights (one fp32 scale per output row) for inputs of a few rows:
the adaLN modulation projections of FLUX-style DiTs.

    w8, scale = quantize_weight_int8(weight)         # [N, K] int8, [N] fp32
    out = int8_linear(x, w8, scale, bias)            # x [..., K] bf16/fp16 -> [..., N]

Why: every FLUX / HunyuanVideo block turns the conditioning vector (one row per image) into
its shift / scale / gate with a 3072 -> 18432 (double) or 3072 -> 9216 (single) linear
layer. Those layers are ~27% of FLUX.1-dev's weights, and with one input row their matmul
is a pass over the weight: 6.4 GB of bf16 per step, 2.9 ms of a 91 ms fp8 step on an H100.
Int8 weights halve the bytes. The Triton kernel reads each weight tile once for up to 4
rows and multiplies in fp32 (the int8 -> fp32 conversion is exact), then applies the row
scale and the bias and rounds once to the input's dtype, as `F.linear` rounds. Int8 with a per-row scale is the more accurate 8-bit format here: a step
of amax / 127 (~1% of a typical weight) against fp8 e4m3's 3 mantissa bits.

Elsewhere (CPU without Triton's interpreter, other dtypes) `int8_linear` computes the same
in torch (dequantizing the weight on the fly): correct, not faster.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .fp8_rowwise import _HAVE_TRITON, _HAVE_TRITON_OP, quantizes_here

INT8_MAX = 127.0
MAX_ROWS_PER_TILE = 4  # rows of x that share one read of a weight tile (more rows: more tiles)


def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 [N, K], fp32 [N]): symmetric per-row scale amax / 127, values rounded to nearest."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(1e-12)
    w8 = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return w8, scale


def int8_linear_reference(x: Tensor, w8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The plain computation: fp32 x @ w8^T, times the row scales, plus bias, in x's dtype."""
    out = (x.float() @ w8.float().t()) * scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def why_not_triton(x: Tensor, w8: Tensor, scale: Tensor, bias: Tensor | None) -> str | None:
    """None when the Triton kernel can take these inputs, else the reason."""
    if not (_HAVE_TRITON and _HAVE_TRITON_OP):
        return "triton (and torch.library.triton_op) are needed"
    if not quantizes_here(x):
        return f"tensors on {x.device.type}"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"input dtype {x.dtype} (bf16 or fp16)"
    if w8.dtype != torch.int8 or w8.ndim != 2 or not w8.is_contiguous() or x.shape[-1] != w8.shape[1]:
        return f"weight {tuple(w8.shape)} {w8.dtype} for input {tuple(x.shape)}"
    if scale.dtype != torch.float32 or scale.shape != (w8.shape[0],) or not scale.is_contiguous():
        return f"scale {tuple(scale.shape)} {scale.dtype}"
    if bias is not None and (bias.shape != (w8.shape[0],) or not bias.is_contiguous()):
        return f"bias {tuple(bias.shape)}"
    return None


def int8_linear(x: Tensor, w8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """`x @ dequantized(w8)^T + bias` for x [..., K]: the Triton kernel where it can run
    (`why_not_triton`), the plain computation elsewhere."""
    if why_not_triton(x, w8, scale, bias) is None:
        from . import triton_int8_linear  # registers the op

        rows = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():  # one opaque node for the compiler
            out = torch.ops.para_attn.int8_linear(rows, w8, scale, bias)
        else:  # eager: the launch without the custom op's dispatch (host time per call)
            out = triton_int8_linear.launch(rows, w8, scale, bias)
        return out.reshape(*x.shape[:-1], w8.shape[0])
    return int8_linear_reference(x, w8, scale, bias)
