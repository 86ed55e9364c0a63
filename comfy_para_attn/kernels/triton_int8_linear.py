"""Triton kernel of `kernels.int8_linear` (imported only where triton is)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._runtime import interpreting
from .int8_linear import MAX_ROWS_PER_TILE
from .triton_fp8_rowwise import _round_to_bf16


@triton.jit
def _int8_linear(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                 HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr):
    """Output columns [n, n + BLOCK_N) of rows [m, m + BLOCK_M): each weight tile is read once
    for all BLOCK_M rows. A pass over the weight with one to four rows is memory-bound: the
    products go through the FMA units in fp32 (int8 -> fp32 is exact) and are summed over K
    once at the end; tensor-core tiles of 16 rows were slower here."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok, row_ok = cols < N, rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    out = tl.sum(acc, axis=2) * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if OUT_BF16:
        out = _round_to_bf16(out, SOFTWARE_ROUNDING)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# One configuration, no autotuning (which added ~5 s to a compiled FLUX model's warm-up): small
# column tiles so that every SM holds several programs (FLUX's 9216- and 18432-row layers
# make 576 / 1152 programs). Best of six on an H100 for both (bench/bench_int8_linear.py).
GPU_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 256}  # for one row; BLOCK_K shrinks with more rows (registers)
GPU_LAUNCH = {"num_warps": 4, "num_stages": 3}
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 32}


def _launch(x, w8, scale, bias, launcher):
    M, K = x.shape
    N = w8.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    block_m = min(triton.next_power_of_2(M), MAX_ROWS_PER_TILE)
    args = (x, w8, scale, bias if bias is not None else scale, out, M, N, K, x.stride(0), out.stride(0))
    flags = dict(HAS_BIAS=bias is not None, OUT_BF16=x.dtype == torch.bfloat16, BLOCK_M=block_m,
                 SOFTWARE_ROUNDING=interpreting())
    blocks, launch_options = (INTERPRETER_BLOCKS, {}) if interpreting() else (GPU_BLOCKS, GPU_LAUNCH)
    # the accumulator holds BLOCK_M x BLOCK_N x BLOCK_K fp32 values: keep it at one row's size
    blocks = dict(blocks, BLOCK_K=max(32, blocks["BLOCK_K"] // block_m))
    grid = (triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(M, block_m))
    launcher(_int8_linear)[grid](*args, **flags, **blocks, **launch_options)
    return out


def launch(x, w8, scale, bias):
    return _launch(x, w8, scale, bias, lambda kernel: kernel)


def _fake(x, w8, scale, bias):
    return x.new_empty((x.shape[0], w8.shape[0]))


if not interpreting():
    @triton_op("para_attn::int8_linear", mutates_args={})
    def int8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
        return _launch(x, w8, scale, bias, wrap_triton)
else:
    @torch.library.custom_op("para_attn::int8_linear", mutates_args=())
    def int8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> torch.Tensor:
        return _launch(x, w8, scale, bias, lambda kernel: kernel)

    int8_linear.register_fake(_fake)
