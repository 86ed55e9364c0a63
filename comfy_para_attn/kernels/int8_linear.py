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
MAX_ROWS_PER_TILE = 4  # rows of x that share one read of a weight tile
MAX_KERNEL_ROWS = 8  # more rows dequantize the weight for one matmul instead (each tile of 4 re-reads it)
_QUANTIZE_ROWS = 2048  # rows converted at a time: fp32 temporaries of a slice, not of the whole weight


def quantize_weight_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 [N, K], fp32 [N]): symmetric per-row scale amax / 127, values rounded to nearest."""
    weight = weight.detach()
    w8 = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], _QUANTIZE_ROWS):
        w = weight[start:start + _QUANTIZE_ROWS].float()
        s = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(1e-12)
        w8[start:start + _QUANTIZE_ROWS] = torch.round(w / s[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        scale[start:start + _QUANTIZE_ROWS] = s
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
    if any(t is not None and t.device != x.device for t in (w8, scale, bias)):
        return "weight, scale or bias on another device than the input"
    rows = x.numel() // max(1, x.shape[-1])
    if not 0 < rows <= MAX_KERNEL_ROWS:
        return f"{rows} input rows (the kernel takes 1 to {MAX_KERNEL_ROWS})"
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
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.numel():
        # many rows: one pass to dequantize, then the library's matmul (int8 values are exact in
        # bf16 / fp16; the row scale after, in fp32)
        out = torch.nn.functional.linear(x, w8.to(x.dtype)).float() * scale
        return (out + bias.float() if bias is not None else out).to(x.dtype)
    return int8_linear_reference(x, w8, scale, bias)
