"""Row-wise fp8 quantization of an MLP's hidden activations with the tanh GELU applied on the
way: one pass over the rows, for the fp8 matmul that follows.

The row may come in two pieces (`cat_gelu_rowwise_fp8(head, tail)`: the GELU on the tail):
FLUX's single blocks concatenate the attention output and the MLP's hidden activations,
a copy of ~140 MB per block that the kernel saves by reading both where they are.

FLUX's and HunyuanVideo's blocks feed `linear2` with `cat(attention, gelu(mlp))` (single
blocks) or `gelu(mlp)` (the double blocks' MLPs). Under torch.compile with torchao's dynamic
row-wise fp8, inductor quantizes that input in two passes (row amax, then the cast), each
recomputing the GELU with libdevice's tanh: 11.2 ms of a 101 ms FLUX.1-dev step on an H200,
compute-bound at ~1.5 TB/s. This kernel reads each row once, keeps it in registers and
writes the fp8 row and its scale.

Numerics follow torchao's `Float8Tensor.from_hp` for `PerRow` activations exactly where it
matters: GELU rounded to bf16 (as the model's own `nn.GELU` output is), scale = amax / 448
rounded to bf16, then values / scale clamped to +-448 and rounded to
float8_e4m3fn (times the reciprocal scale: a value can land one fp8 step away where
division would round the other way). On NVIDIA GPUs the tanh is the hardware's
`tanh.approx.f32` (relative error <= 2^-10.99): the exact form made the kernel compute-bound
(H100: 84 -> 66 us for a 4096 x 12288 input, 90 -> 75 us for FLUX's single block). It moves
the GELU's bf16 rounding now and then, so ~0.13% of the fp8 values land one step from
torchao's (0.012% with the exact form), far inside fp8's own rounding error. Elsewhere
(Triton's interpreter, ROCm) the tanh is 1 - 2 / (1 + exp(2y)), ~1e-7 from torch's. A row of zeros gets scale > 0 (and
zeros) where torchao would divide 0 by 0.

The same quantization also comes after a LayerNorm and its modulation
(`layer_norm_modulate_rowwise_fp8`): FLUX's and HunyuanVideo's blocks feed every attention
and MLP input layer `(1 + scale) * layer_norm(x) + shift`, which inductor computed with the
quantization in two or three passes over the row (4.6 ms of a 90 ms FLUX.1-dev fp8 step on an
H100, ~1.2 ms at memory speed). The kernel reads x once and writes the fp8 row and its scale.
It rounds like the eager computation: the LayerNorm's output to bf16, then the modulated
value to bf16.
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from ._runtime import interpreting

# Read once: `why_not_triton` runs inside compiled blocks, where a cached call would not trace.
_HAVE_TRITON = importlib.util.find_spec("triton") is not None
_HAVE_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")  # torch >= 2.6

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
MIN_SCALE = 1e-12  # a row of zeros quantizes to zeros, not 0 / 0


def gelu_tail_rowwise_fp8_reference(x: Tensor, gelu_from: int) -> tuple[Tensor, Tensor]:
    """The plain-torch computation: columns >= `gelu_from` of the 2-D `x` through the tanh
    GELU, then (fp8 values [M, K], fp32 scales [M, 1]) per row as torchao makes them."""
    y = torch.cat((x[:, :gelu_from], torch.nn.functional.gelu(x[:, gelu_from:], approximate="tanh")), dim=1)
    scale = (y.abs().amax(dim=1, keepdim=True) / FP8_MAX).float().clamp(min=MIN_SCALE)
    q = (y.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantizes_here(x: Tensor) -> bool:
    """Where the fused quantization runs: CUDA, or CPU under Triton's interpreter (the CPU
    tests); elsewhere callers keep the unfused path."""
    return x.is_cuda or (interpreting() and x.device.type == "cpu")


def why_not_triton(x: Tensor) -> str | None:
    """None when the Triton kernel can quantize `x` here, else the reason."""
    if not _HAVE_TRITON:
        return "triton is not installed"
    if not _HAVE_TRITON_OP:
        return f"torch {torch.__version__} has no torch.library.triton_op (needs 2.6 or newer)"
    if not quantizes_here(x):
        return f"tensors on {x.device.type}"
    if x.dtype != torch.bfloat16:
        return f"dtype {x.dtype} (the kernel rounds like bf16; row-wise fp8 needs bf16 models)"
    if x.ndim != 2 or (x.stride(1) != 1 and x.shape[1] > 1):
        return "not a row-major matrix"
    if x.shape[1] > 65536:
        return f"rows of {x.shape[1]} values do not fit one block"
    return None


def gelu_tail_rowwise_fp8_triton(x: Tensor, gelu_from: int) -> tuple[Tensor, Tensor]:
    """The Triton kernel on a row-major bf16 matrix (see `why_not_triton`), through the op
    `torch.ops.para_attn.gelu_tail_rowwise_fp8` (a `triton_op`: inside a compiled graph
    inductor launches the kernel from its own code, no Python dispatch per call)."""
    from . import triton_fp8_rowwise  # noqa: F401  registers the op

    return torch.ops.para_attn.gelu_tail_rowwise_fp8(x, gelu_from)


def gelu_tail_rowwise_fp8(x: Tensor, gelu_from: int) -> tuple[Tensor, Tensor]:
    """(fp8 rows, fp32 row scales) of `x` [M, K] with the tanh GELU on columns >= gelu_from:
    the Triton kernel where it can run, the plain computation elsewhere."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    if why_not_triton(x) is None:
        return gelu_tail_rowwise_fp8_triton(x, gelu_from)
    return gelu_tail_rowwise_fp8_reference(x, gelu_from)


def cat_gelu_rowwise_fp8(head: Tensor, tail: Tensor) -> tuple[Tensor, Tensor]:
    """`gelu_tail_rowwise_fp8(torch.cat((head, tail), 1), head.shape[1])` without the
    concatenation where the kernel runs (2-D pieces with the same rows, any row strides)."""
    fits = head.shape[1] + tail.shape[1] <= 65536
    if fits and why_not_triton(head) is None and why_not_triton(tail) is None:
        from . import triton_fp8_rowwise  # noqa: F401  registers the op

        return torch.ops.para_attn.cat_gelu_rowwise_fp8(head, tail)
    return gelu_tail_rowwise_fp8_reference(torch.cat((head, tail), 1), head.shape[1])


def layer_norm_modulate_rowwise_fp8_reference(x: Tensor, mul: Tensor, shift: Tensor,
                                              eps: float) -> tuple[Tensor, Tensor]:
    """The plain-torch computation: rows of `torch.addcmul(shift, layer_norm(x), mul)` (x
    [B, S, K]; mul, shift [B or 1, 1, K]) as (fp8 values [B*S, K], fp32 scales [B*S, 1])."""
    y = torch.addcmul(shift, torch.nn.functional.layer_norm(x, (x.shape[-1],), None, None, eps), mul)
    return gelu_tail_rowwise_fp8_reference(y.reshape(-1, x.shape[-1]), x.shape[-1])


def why_not_norm_kernel(x: Tensor, mul: Tensor, shift: Tensor, any_strides: bool = False) -> str | None:
    """None when `layer_norm_modulate_rowwise_fp8` can run the Triton kernel on these inputs
    (`any_strides`: as the op takes them, copying inputs whose features are strided)."""
    if x.ndim != 3:
        return f"x has {x.ndim} dims (the kernel takes [batch, tokens, features])"
    if x.shape[2] > 65536:
        return f"rows of {x.shape[2]} values do not fit one block"
    reason = why_not_triton(x[0] if not any_strides or x.stride(2) == 1 else x[0, :1, :1])
    if reason is not None:
        return reason
    for name, t in (("mul", mul), ("shift", shift)):
        if t.dtype != x.dtype or t.device != x.device:
            return f"{name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}"
        if t.ndim != 3 or t.shape[1] != 1 or t.shape[2] != x.shape[2] or t.shape[0] not in (1, x.shape[0]):
            return f"{name} of shape {tuple(t.shape)} is not one vector per batch for x {tuple(x.shape)}"
        if t.stride(2) != 1 and t.shape[2] > 1 and not any_strides:
            return f"{name}'s features are strided"
    return None


def layer_norm_modulate_rowwise_fp8(x: Tensor, mul: Tensor, shift: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(fp8 rows, fp32 row scales) of `addcmul(shift, layer_norm(x), mul)` for x [B, S, K]:
    the Triton kernel where it can run, the plain computation elsewhere."""
    if why_not_norm_kernel(x, mul, shift) is None:
        from . import triton_fp8_rowwise  # noqa: F401  registers the op

        return torch.ops.para_attn.layer_norm_modulate_rowwise_fp8(x, mul, shift, eps)
    return layer_norm_modulate_rowwise_fp8_reference(x, mul, shift, eps)
