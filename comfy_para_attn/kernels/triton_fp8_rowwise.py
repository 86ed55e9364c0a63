"""Triton kernels of `kernels.fp8_rowwise` (imported only where triton is)."""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._runtime import interpreting
from .fp8_rowwise import FP8_MAX, MIN_SCALE
from .triton_flash import LOG2E

_FP8_MAX = tl.constexpr(FP8_MAX)
_MIN_SCALE = tl.constexpr(MIN_SCALE)
_TWO_LOG2E = tl.constexpr(2 * LOG2E)  # tanh(y) = 1 - 2 / (1 + 2^(2 y log2 e))
_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2 / math.pi))


@triton.jit
def _round_to_bf16(v, SOFTWARE: tl.constexpr):
    """fp32 -> nearest bf16 (ties to even), returned as fp32. Triton's interpreter truncates
    in `.to(tl.bfloat16)`, so there the rounding is done on the bits."""
    if SOFTWARE:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return v.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _gelu_tail_rowwise_fp8(head_ptr, tail_ptr, q_ptr, scale_ptr, stride_head, stride_tail, stride_q, K, gelu_from,
                           BLOCK_K: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr, FAST_TANH: tl.constexpr):
    """Row `r` is head[r, :gelu_from] then tail[r, :K - gelu_from] (two pointers: the pieces
    of a concatenation need not be one tensor); the tail goes through the GELU."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    in_head = cols < gelu_from
    in_tail = (cols >= gelu_from) & (cols < K)
    head = tl.load(head_ptr + row * stride_head + cols, mask=in_head, other=0.0)
    tail = tl.load(tail_ptr + row * stride_tail + (cols - gelu_from), mask=in_tail, other=0.0)
    x = tl.where(in_head, head, tail).to(tl.float32)
    inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
    if FAST_TANH:  # one MUFU instruction: the exact form made the kernel compute-bound (84 -> 66 us)
        tanh = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [inner], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        tanh = 1.0 - 2.0 / (1.0 + tl.exp2(inner * _TWO_LOG2E))
    gelu = _round_to_bf16(0.5 * x * (1.0 + tanh), SOFTWARE_ROUNDING)  # the model's GELU output is bf16
    _store_rowwise_fp8(tl.where(in_head, x, gelu), cols, cols < K, q_ptr + row * stride_q, scale_ptr + row,
                       SOFTWARE_ROUNDING)


@triton.jit
def _store_rowwise_fp8(y, cols, valid, q_row_ptr, scale_ptr, SOFTWARE_ROUNDING: tl.constexpr):
    """Quantize one row `y` (fp32 holding bf16 values, zeros where not `valid`) as torchao's
    PerRow activations: scale = amax / 448 rounded to bf16; store the fp8 row and its scale."""
    amax = tl.max(tl.abs(y), axis=0)
    scale = tl.maximum(_round_to_bf16(amax / _FP8_MAX, SOFTWARE_ROUNDING), _MIN_SCALE)
    q = tl.minimum(tl.maximum(y * (1.0 / scale), -_FP8_MAX), _FP8_MAX)  # one reciprocal per row
    tl.store(q_row_ptr + cols, q.to(q_row_ptr.dtype.element_ty), mask=valid)
    tl.store(scale_ptr, scale)


@triton.jit
def _layer_norm_modulate_rowwise_fp8(x_ptr, mul_ptr, shift_ptr, q_ptr, scale_ptr, stride_xb, stride_xs,
                                     stride_mul, stride_shift, K, eps,
                                     BLOCK_K: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr):
    """Token `s` of batch `b` (grid (S, B)): LayerNorm without affine, rounded to bf16 as
    `F.layer_norm`'s output is, then `shift[b] + normed * mul[b]` rounded to bf16 as
    `torch.addcmul`'s output is, then the row-wise fp8 quantization of that row."""
    eps = tl.cast(eps, tl.float32)  # inductor passes a Python float as fp64: the row's math would follow
    token = tl.program_id(0).to(tl.int64)
    batch = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    valid = cols < K
    x = tl.load(x_ptr + batch * stride_xb + token * stride_xs + cols, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / K
    centered = tl.where(valid, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / K + eps)
    normed = _round_to_bf16(centered * rstd, SOFTWARE_ROUNDING)
    mul = tl.load(mul_ptr + batch * stride_mul + cols, mask=valid, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + batch * stride_shift + cols, mask=valid, other=0.0).to(tl.float32)
    y = tl.where(valid, _round_to_bf16(normed * mul + shift, SOFTWARE_ROUNDING), 0.0)
    row = batch * tl.num_programs(0) + token
    _store_rowwise_fp8(y, cols, valid, q_ptr + row * K, scale_ptr + row, SOFTWARE_ROUNDING)


def _launch(head: torch.Tensor, tail: torch.Tensor, launcher) -> tuple[torch.Tensor, torch.Tensor]:
    head = head if head.stride(-1) == 1 else head.contiguous()
    tail = tail if tail.stride(-1) == 1 else tail.contiguous()
    m, gelu_from = head.shape
    k = gelu_from + tail.shape[1]
    interpreted = interpreting()
    # The interpreter's fp8 conversion is not round-to-nearest (124.6 became 64): there the
    # kernel writes the scaled, clamped values in fp32 and torch rounds them to fp8.
    q = torch.empty((m, k), device=tail.device, dtype=torch.float32 if interpreted else torch.float8_e4m3fn)
    scale = torch.empty((m, 1), device=tail.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    warps = 4 if interpreted else (NUM_WARPS or max(4, min(8, block // 1024)))  # 8: best at 12288-16384 values
    launcher(_gelu_tail_rowwise_fp8)[(m,)](head, tail, q, scale, head.stride(0), tail.stride(0), q.stride(0), k,
                                          gelu_from, BLOCK_K=block, SOFTWARE_ROUNDING=interpreted,
                                          FAST_TANH=FAST_TANH and not interpreted, num_warps=warps)
    return (q.to(torch.float8_e4m3fn) if interpreted else q), scale


def _launch_norm(x: torch.Tensor, mul: torch.Tensor, shift: torch.Tensor, eps: float,
                 launcher) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, S, K], mul and shift [B or 1, 1, K]: see `_layer_norm_modulate_rowwise_fp8`. Inputs
    whose features are strided (HunyuanVideo's first image tokens come transposed) are copied."""
    x, mul, shift = (t if t.stride(2) == 1 else t.contiguous() for t in (x, mul, shift))
    batch, seq, k = x.shape
    interpreted = interpreting()
    q = torch.empty((batch * seq, k), device=x.device, dtype=torch.float32 if interpreted else torch.float8_e4m3fn)
    scale = torch.empty((batch * seq, 1), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(k)
    warps = 4 if interpreted else (NUM_WARPS or max(4, min(8, block // 1024)))
    launcher(_layer_norm_modulate_rowwise_fp8)[(seq, batch)](
        x, mul, shift, q, scale, x.stride(0), x.stride(1), mul.stride(0) if mul.shape[0] > 1 else 0,
        shift.stride(0) if shift.shape[0] > 1 else 0, k, eps, BLOCK_K=block, SOFTWARE_ROUNDING=interpreted,
        num_warps=warps)
    return (q.to(torch.float8_e4m3fn) if interpreted else q), scale


def _fake_norm(x: torch.Tensor, mul: torch.Tensor, shift: torch.Tensor, eps: float):
    rows = x.shape[0] * x.shape[1]
    return (torch.empty((rows, x.shape[2]), device=x.device, dtype=torch.float8_e4m3fn),
            torch.empty((rows, 1), device=x.device, dtype=torch.float32))


def _fake(head: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = tail.shape[0]
    return (torch.empty((m, head.shape[1] + tail.shape[1]), device=tail.device, dtype=torch.float8_e4m3fn),
            torch.empty((m, 1), device=tail.device, dtype=torch.float32))


NUM_WARPS = None  # None: by row length; bench/bench_fp8_gelu_quant.py --sweep sets it
FAST_TANH = torch.version.hip is None  # PTX's tanh.approx.f32 (NVIDIA); the exact form elsewhere

if not interpreting():
    # triton_ops: inside a compiled graph inductor launches the kernel from its own code.
    @triton_op("para_attn::gelu_tail_rowwise_fp8", mutates_args={})
    def gelu_tail_rowwise_fp8(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(x[:, :gelu_from], x[:, gelu_from:], wrap_triton)

    @triton_op("para_attn::cat_gelu_rowwise_fp8", mutates_args={})
    def cat_gelu_rowwise_fp8(head: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(head, tail, wrap_triton)

    @triton_op("para_attn::layer_norm_modulate_rowwise_fp8", mutates_args={})
    def layer_norm_modulate_rowwise_fp8(x: torch.Tensor, mul: torch.Tensor, shift: torch.Tensor,
                                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_norm(x, mul, shift, eps, wrap_triton)
else:
    # Triton's interpreter runs kernels on real CPU tensors, which fake tracing cannot give
    # it: there the ops are opaque, with their output shapes declared.
    @torch.library.custom_op("para_attn::gelu_tail_rowwise_fp8", mutates_args=())
    def gelu_tail_rowwise_fp8(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(x[:, :gelu_from], x[:, gelu_from:], lambda kernel: kernel)

    @gelu_tail_rowwise_fp8.register_fake
    def _(x: torch.Tensor, gelu_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _fake(x[:, :gelu_from], x[:, gelu_from:])

    @torch.library.custom_op("para_attn::cat_gelu_rowwise_fp8", mutates_args=())
    def cat_gelu_rowwise_fp8(head: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(head, tail, lambda kernel: kernel)

    cat_gelu_rowwise_fp8.register_fake(_fake)

    @torch.library.custom_op("para_attn::layer_norm_modulate_rowwise_fp8", mutates_args=())
    def layer_norm_modulate_rowwise_fp8(x: torch.Tensor, mul: torch.Tensor, shift: torch.Tensor,
                                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch_norm(x, mul, shift, eps, lambda kernel: kernel)

    layer_norm_modulate_rowwise_fp8.register_fake(_fake_norm)
