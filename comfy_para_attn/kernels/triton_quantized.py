"""Quantized attention for Hopper (and Ada): int8 Q.K^T, fp8 (e4m3) P.V, fp32 softmax and
accumulation. Imports triton: load it lazily.

The recipe (after SageAttention 2), each step for accuracy at 2x tensor-core rate:
- K smoothing: subtract the per-head mean key. Every score of a query row shifts by the
  same q.mean_k, which softmax ignores; the lse gets it back exactly (`lse_offset`).
  It removes the shared offset that would otherwise eat int8 range.
- Q: int8 with one scale per token (row), so an outlier query costs only its own row. The
  softmax scale and log2(e) ride in Q's scale.
- K: int8 with one scale per block of KEY_BLOCK keys (after smoothing; FLUX, HunyuanVideo and
  Wan RMS-normalize k, so keys of a block have similar norms). A block's scale is one number,
  so it joins Q's row scale and the score costs one FMA, not a multiply per key as well.
- int32 -> fp32 by the magic-number trick: an int8 dot over <= 128 channels stays under 2^22,
  so dot + 0x4B400000 read as a float is 1.5 * 2^23 + dot exactly; the 1.5 * 2^23 folds into the
  row's shift. Together (H100, one run, vs cuDNN bf16 at 4608 / 33660 / 67320 tokens):
  0.71x / 1.12x / 1.14x -> 0.76x / 1.13x / 1.21x; cosine to fp32 0.9998-0.9999 either way.
- V: fp8 e4m3 with one scale per channel over the sequence, stored transposed
  ([B, H, D, S]) because fp8 wgmma wants the reduction (key) dim contiguous.
- P: in [0, 1] after the running-max shift; scaled by 448 (e4m3's max) before the cast so
  small probabilities stay normal numbers. The row sum is taken from unquantized P.
- P.V accumulates each key block in the tensor core and adds blocks in fp32
  (`max_num_imprecise_acc=BLOCK_N`): Hopper's fp8 accumulator is narrower than fp32.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ._runtime import device_capability, interpreting
from .fp8_rowwise import FP8_MAX
from .triton_flash import LOG2E, biased_masked_scores, seq_bucket

LOG2_FP8_MAX = tl.constexpr(math.log2(FP8_MAX))
KEY_BLOCK = tl.constexpr(128)  # keys per K scale; every BLOCK_N divides it
MAGIC_INT = tl.constexpr(0x4B400000)  # the bits of MAGIC_FLOAT
MAGIC_FLOAT = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding an integer below 2**22 lands in the mantissa


@triton.jit
def _round_to_e4m3(x):
    """fp32 rounded to the nearest e4m3 value (as fp32). Only for the interpreter, whose own
    fp32->fp8 cast drops the carry when the mantissa rounds up."""
    mag = tl.abs(x)
    exponent = tl.maximum(tl.floor(tl.math.log2(tl.maximum(mag, 1e-30))), -6.0)  # subnormal step 2^-9
    step = tl.math.exp2(exponent - 3.0)
    rounded = tl.minimum(tl.floor(mag / step + 0.5) * step, 448.0)
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def _load_head_rows(X, stride_xb, stride_xh, stride_xs, num_heads, seq, HEAD_DIM: tl.constexpr,
                    BLOCK_S: tl.constexpr):
    """The program's BLOCK_S tokens of one (batch, head) of X [B, H, S, D] in fp32 (program
    axes: token block, batch x head; rows past `seq` read 0), with the indices the caller
    stores by: (x, batch_head, offs_s, offs_d, row_valid)."""
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_s < seq
    ptrs = X + batch * stride_xb + head * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :]
    return tl.load(ptrs, mask=row_valid[:, None], other=0.0).to(tl.float32), batch_head, offs_s, offs_d, row_valid


@triton.jit
def quantize_rows_int8_kernel(
    X, Mean, Xq, Scale, MeanDot,
    stride_xb, stride_xh, stride_xs, num_heads, seq, scale_mult, mean_dot_mult,
    HEAD_DIM: tl.constexpr, SUBTRACT_MEAN: tl.constexpr, DOT_MEAN: tl.constexpr, PER_BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """int8 per token (or, with PER_BLOCK, one step for the program's BLOCK_S tokens):
    Xq = round((X - mean) / step), Scale = step * scale_mult;
    optionally MeanDot = (X . mean) * mean_dot_mult (the lse offset of K smoothing)."""
    x, batch_head, offs_s, offs_d, row_valid = _load_head_rows(X, stride_xb, stride_xh, stride_xs, num_heads, seq,
                                                               HEAD_DIM, BLOCK_S)
    mean = tl.load(Mean + batch_head.to(tl.int64) * HEAD_DIM + offs_d)
    row_base = batch_head.to(tl.int64) * seq
    if DOT_MEAN:
        tl.store(MeanDot + row_base + offs_s, tl.sum(x * mean[None, :], 1) * mean_dot_mult, mask=row_valid)
    if SUBTRACT_MEAN:
        x = tl.where(row_valid[:, None], x - mean[None, :], 0.0)
    if PER_BLOCK:
        step = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-20) / 127.0
        scaled = x / step
    else:
        step = tl.maximum(tl.max(tl.abs(x), 1), 1e-20) / 127.0
        scaled = x / step[:, None]
    rounded = tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5)  # round half away, then truncate
    xq = tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)
    tl.store(Xq + row_base * HEAD_DIM + offs_s[:, None] * HEAD_DIM + offs_d[None, :], xq, mask=row_valid[:, None])
    if PER_BLOCK:
        tl.store(Scale + batch_head.to(tl.int64) * tl.num_programs(0) + tl.program_id(0), step * scale_mult)
    else:
        tl.store(Scale + row_base + offs_s, step * scale_mult, mask=row_valid)


@triton.jit
def quantize_v_fp8_kernel(
    V, VScale, Vt, stride_vb, stride_vh, stride_vs, num_heads, seq, seq_padded,
    HEAD_DIM: tl.constexpr, EMULATE_FP8: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Vt[b, h, d, s] = fp8(V[b, h, s, d] / VScale[b, h, d]) (fp16 holding e4m3 values when emulating)."""
    v, batch_head, offs_s, offs_d, row_valid = _load_head_rows(V, stride_vb, stride_vh, stride_vs, num_heads, seq,
                                                               HEAD_DIM, BLOCK_S)
    inv_scale = 1.0 / tl.load(VScale + batch_head.to(tl.int64) * HEAD_DIM + offs_d)
    scaled = v * inv_scale[None, :]
    out_ptrs = Vt + batch_head.to(tl.int64) * HEAD_DIM * seq_padded + offs_d[None, :] * seq_padded + offs_s[:, None]
    if EMULATE_FP8:
        tl.store(out_ptrs, _round_to_e4m3(scaled).to(tl.float16), mask=row_valid[:, None])
    else:
        tl.store(out_ptrs, scaled.to(tl.float8e4nv), mask=row_valid[:, None])


@triton.jit
def _attend_quantized_block(
    acc, row_sum, row_max, q, q_scale, k_ptrs, k_scale_ptrs, v_ptrs, bias_ptrs, start_n, seq_k,
    stride_bias_s,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, EMULATE_FP8: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_valid = offs_n < seq_k
    if MASK_KEYS:
        k = tl.load(k_ptrs + start_n * HEAD_DIM, mask=key_valid[:, None], other=0)
    else:
        k = tl.load(k_ptrs + start_n * HEAD_DIM)
    # Scores in log2 units are dot * unit, unit = q_scale * (this key block's scale) > 0, so it
    # factors out of the row max. `biased` is MAGIC_FLOAT + dot exactly (see the module doc).
    # e4m3's 448 is a shift of log2(448): P comes out scaled for the fp8 cast; row_sum and acc
    # carry the same factor.
    unit = q_scale * tl.load(k_scale_ptrs + start_n // KEY_BLOCK)
    biased = (tl.dot(q, tl.trans(k)) + MAGIC_INT).to(tl.float32, bitcast=True)
    if HAS_BIAS or MASK_KEYS:
        qk, new_max, shift = biased_masked_scores((biased - MAGIC_FLOAT) * unit[:, None], row_max, bias_ptrs,
                                                  offs_n, key_valid, stride_bias_s, HAS_BIAS, MASK_KEYS)
        p = tl.math.exp2(qk - (shift - LOG2_FP8_MAX)[:, None])
    else:
        new_max = tl.maximum(row_max, (tl.max(biased, 1) - MAGIC_FLOAT) * unit)
        shift = new_max
        p = tl.math.exp2(biased * unit[:, None] - (unit * MAGIC_FLOAT + shift - LOG2_FP8_MAX)[:, None])
    rescale = tl.math.exp2(row_max - shift)
    row_sum = row_sum * rescale + tl.sum(p, 1)
    if MASK_KEYS:
        v = tl.load(v_ptrs + start_n, mask=key_valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs + start_n)
    acc = acc * rescale[:, None]
    if EMULATE_FP8:
        acc += tl.dot(_round_to_e4m3(p).to(tl.float16), v)
    else:
        acc = tl.dot(p.to(tl.float8e4nv), v, acc, max_num_imprecise_acc=BLOCK_N)
    return acc, row_sum, new_max


@triton.jit
def quantized_attention_kernel(
    Q8, QScale, K8, KScale, Vt, VScale, LseOffset, Bias, Out, Lse,
    stride_ob, stride_oh, stride_os, stride_bias_b, stride_bias_s,
    num_heads, seq_q, seq_k, seq_k_padded, seq_bucket,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, EMULATE_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1).to(tl.int64)
    batch = batch_head // num_heads
    head = batch_head % num_heads
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seq_q

    q_rows = batch_head * seq_q + offs_m
    q = tl.load(Q8 + q_rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_valid[:, None], other=0)
    q_scale = tl.load(QScale + q_rows, mask=row_valid, other=0.0)
    k_ptrs = K8 + (batch_head * seq_k + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    k_scale_ptrs = KScale + batch_head * tl.cdiv(seq_k, KEY_BLOCK)
    v_ptrs = Vt + batch_head * HEAD_DIM * seq_k_padded + offs_n[:, None] + offs_d[None, :] * seq_k_padded
    bias_ptrs = Bias + batch * stride_bias_b

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end = (seq_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, row_sum, row_max = _attend_quantized_block(
            acc, row_sum, row_max, q, q_scale, k_ptrs, k_scale_ptrs, v_ptrs, bias_ptrs, start_n, seq_k,
            stride_bias_s, HEAD_DIM, HAS_BIAS, False, EMULATE_FP8, BLOCK_N,
        )
    if full_end < seq_k:
        acc, row_sum, row_max = _attend_quantized_block(
            acc, row_sum, row_max, q, q_scale, k_ptrs, k_scale_ptrs, v_ptrs, bias_ptrs, full_end, seq_k,
            stride_bias_s, HEAD_DIM, HAS_BIAS, True, EMULATE_FP8, BLOCK_N,
        )

    safe_sum = tl.where(row_sum == 0.0, 1.0, row_sum)
    v_scale = tl.load(VScale + batch_head * HEAD_DIM + offs_d)
    out = acc * v_scale[None, :] / safe_sum[:, None]
    out_ptrs = Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None])
    lse = (row_max + tl.math.log2(row_sum) - LOG2_FP8_MAX) * 0.6931471805599453 + tl.load(LseOffset + q_rows, mask=row_valid, other=0.0)
    tl.store(Lse + q_rows, lse, mask=row_valid)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 4, 3), (128, 128, 8, 3),
        (128, 128, 8, 4), (64, 128, 4, 3), (128, 128, 8, 2),
    ]
]
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}
QUANT_BLOCK_S = 64

# Hopper: the two tiles that won every length in a sweep of the list above (H100, raw kernel,
# `bench/sweep_flash_configs.py --quantized`): 64x128 / 4 warps at 4608 and 18,360 tokens (1.03x /
# 1.20x of cuDNN bf16), 128x128 / 8 warps at 33,660 and 67,320 (1.20x / 1.25x), each within 2% of
# the other's best at the lengths it lost. Tuning between two compiles two kernels on first use,
# not seven: HunyuanVideo's first step at 67k tokens took 49 s with the whole list against 21 s
# for cuDNN (Triton's disk cache keeps them afterwards).
_HOPPER_CONFIGS = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
                   triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3)]


@functools.lru_cache(maxsize=None)
def _autotuned(hopper: bool = False):
    configs = _HOPPER_CONFIGS if hopper else _GPU_CONFIGS
    return triton.autotune(configs=configs, key=["HEAD_DIM", "HAS_BIAS", "seq_bucket"])(quantized_attention_kernel)


def quantize_inputs(q, k, v, scale: float):
    """The pre-pass: (q8, q_scale, k8, k_scale, vt8, v_scale, lse_offset), all contiguous."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    device = q.device
    emulate = interpreting()
    k_mean = k.mean(dim=2, dtype=torch.float32).contiguous()  # [B, H, D]
    v_min, v_max = torch.aminmax(v, dim=2)  # one pass, no |v| temporary
    v_scale = (torch.maximum(-v_min.float(), v_max.float()).clamp_min(1e-20) / FP8_MAX).contiguous()

    q8 = torch.empty((batch, heads, seq_q, head_dim), dtype=torch.int8, device=device)
    k8 = torch.empty((batch, heads, seq_k, head_dim), dtype=torch.int8, device=device)
    q_scale = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=device)
    k_scale = torch.empty((batch, heads, triton.cdiv(seq_k, KEY_BLOCK.value)), dtype=torch.float32, device=device)
    lse_offset = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=device)
    seq_k_padded = triton.cdiv(seq_k, 16) * 16  # 16-byte aligned rows for vectorised loads
    vt_dtype = torch.float16 if emulate else torch.float8_e4m3fn
    vt8 = torch.empty((batch, heads, head_dim, seq_k_padded), dtype=vt_dtype, device=device)

    block_s = 16 if emulate else QUANT_BLOCK_S
    quantize_rows_int8_kernel[(triton.cdiv(seq_q, block_s), batch * heads)](
        q, k_mean, q8, q_scale, lse_offset, q.stride(0), q.stride(1), q.stride(2), heads, seq_q,
        scale * LOG2E, scale, HEAD_DIM=head_dim, SUBTRACT_MEAN=False, DOT_MEAN=True, PER_BLOCK=False,
        BLOCK_S=block_s,
    )
    quantize_rows_int8_kernel[(k_scale.shape[-1], batch * heads)](
        k, k_mean, k8, k_scale, lse_offset, k.stride(0), k.stride(1), k.stride(2), heads, seq_k,
        1.0, 0.0, HEAD_DIM=head_dim, SUBTRACT_MEAN=True, DOT_MEAN=False, PER_BLOCK=True,
        BLOCK_S=KEY_BLOCK.value, num_warps=8,
    )
    quantize_v_fp8_kernel[(triton.cdiv(seq_k, block_s), batch * heads)](
        v, v_scale, vt8, v.stride(0), v.stride(1), v.stride(2), heads, seq_k, seq_k_padded,
        HEAD_DIM=head_dim, EMULATE_FP8=emulate, BLOCK_S=block_s,
    )
    return q8, q_scale, k8, k_scale, vt8, v_scale, lse_offset


def launch_quantized_attention(q, k, v, bias, scale: float):
    """Run pre-pass and kernel; inputs already checked by `_runtime.unsupported_reason`."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    q8, q_scale, k8, k_scale, vt8, v_scale, lse_offset = quantize_inputs(q, k, v, scale)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else lse
    stride_bias_b = (bias.stride(0) if bias.shape[0] > 1 else 0) if has_bias else 0
    stride_bias_s = bias.stride(3) if has_bias else 0
    args = (
        q8, q_scale, k8, k_scale, vt8, v_scale, lse_offset, bias_arg, out, lse,
        out.stride(0), out.stride(1), out.stride(2), stride_bias_b, stride_bias_s,
        heads, seq_q, seq_k, vt8.shape[-1], seq_bucket(seq_q, seq_k),
    )

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    if interpreting():
        quantized_attention_kernel[grid](
            *args, HEAD_DIM=head_dim, HAS_BIAS=has_bias, EMULATE_FP8=True, **INTERPRETER_BLOCKS
        )
    else:
        hopper = device_capability(q.device)[0] == 9
        _autotuned(hopper)[grid](*args, HEAD_DIM=head_dim, HAS_BIAS=has_bias, EMULATE_FP8=False)
    return out, lse
