"""Non-causal flash attention forward in Triton: (out, lse) for fp16/bf16, head dims 64/128,
with an optional additive key bias (key padding mask). Imports triton: load it lazily.

One program owns BLOCK_M query rows of one (batch, head) and streams the keys in blocks of
BLOCK_N with an online softmax in base 2 (exp2 is one instruction; log2(e) folds into the
scale). Full key blocks run unmasked; only the last, partial block pays for bounds checks.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._runtime import device_capability, interpreting

LOG2E = 1.4426950408889634


@triton.jit
def biased_masked_scores(qk, row_max, bias_ptrs, offs_n, key_valid, stride_bias_s,
                         HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr):
    """Scores `qk` (log2 units) plus the key bias, keys past the sequence at -inf; returns
    (scores, new row max, the shift to subtract). A row that has seen only -inf scores keeps
    max -inf and is shifted by 0, not by -inf (inf - inf)."""
    if HAS_BIAS:
        if MASK_KEYS:
            bias = tl.load(bias_ptrs + offs_n * stride_bias_s, mask=key_valid, other=0.0)
        else:
            bias = tl.load(bias_ptrs + offs_n * stride_bias_s)
        qk += bias.to(tl.float32)[None, :] * 1.4426950408889634
    if MASK_KEYS:
        qk = tl.where(key_valid[None, :], qk, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(qk, 1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    return qk, new_max, shift


@triton.jit
def _attend_key_block(
    acc, row_sum, row_max, q, k_ptrs, v_ptrs, bias_ptrs, start_n, seq_k, qk_scale_log2,
    stride_ks, stride_vs, stride_bias_s,
    HAS_BIAS: tl.constexpr, MASK_KEYS: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    key_valid = offs_n < seq_k
    if MASK_KEYS:
        k = tl.load(k_ptrs + start_n * stride_ks, mask=key_valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs + start_n * stride_ks)
    if UPCAST_DOT:  # the interpreter multiplies bf16 bit patterns as integers
        qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)))
    else:
        qk = tl.dot(q, tl.trans(k))
    if HAS_BIAS or MASK_KEYS:
        qk, new_max, shift = biased_masked_scores(qk * qk_scale_log2, row_max, bias_ptrs, offs_n, key_valid,
                                                  stride_bias_s, HAS_BIAS, MASK_KEYS)
        p = tl.math.exp2(qk - shift[:, None])
    else:
        # Finite scores: the scale goes into the row max (BLOCK_M products, not BLOCK_M x
        # BLOCK_N) and into the shift as one FMA per score: 0.73x -> 0.79x of cuDNN (H100).
        shift = tl.maximum(row_max, tl.max(qk, 1) * qk_scale_log2)
        new_max = shift
        p = tl.math.exp2(qk * qk_scale_log2 - shift[:, None])
    rescale = tl.math.exp2(row_max - shift)
    row_sum = row_sum * rescale + tl.sum(p, 1)
    if MASK_KEYS:
        v = tl.load(v_ptrs + start_n * stride_vs, mask=key_valid[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs + start_n * stride_vs)
    acc = acc * rescale[:, None]
    if UPCAST_DOT:
        acc += tl.dot(p, v.to(tl.float32))
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, row_sum, new_max


@triton.jit
def flash_attention_kernel(
    Q, K, V, Bias, Out, Lse,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_bias_b, stride_bias_s,
    num_heads, seq_q, seq_k, qk_scale_log2, seq_bucket,
    HEAD_DIM: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)  # int64: B*H*S*D can pass 2**31
    head = (batch_head % num_heads).to(tl.int64)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_valid = offs_m < seq_q

    q_ptrs = Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    k_ptrs = K + batch * stride_kb + head * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V + batch * stride_vb + head * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :]
    bias_ptrs = Bias + batch * stride_bias_b
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    full_end = (seq_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, row_sum, row_max = _attend_key_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, bias_ptrs, start_n, seq_k, qk_scale_log2,
            stride_ks, stride_vs, stride_bias_s, HAS_BIAS, False, UPCAST_DOT, BLOCK_N,
        )
    if full_end < seq_k:
        acc, row_sum, row_max = _attend_key_block(
            acc, row_sum, row_max, q, k_ptrs, v_ptrs, bias_ptrs, full_end, seq_k, qk_scale_log2,
            stride_ks, stride_vs, stride_bias_s, HAS_BIAS, True, UPCAST_DOT, BLOCK_N,
        )

    safe_sum = tl.where(row_sum == 0.0, 1.0, row_sum)  # only when every score was -inf
    out = acc / safe_sum[:, None]
    out_ptrs = Out + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None])
    lse = (row_max + tl.math.log2(row_sum)) * 0.6931471805599453  # back to natural log
    tl.store(Lse + batch_head.to(tl.int64) * seq_q + offs_m, lse, mask=row_valid)


# Hopper/Ampere candidates; the autotuner drops any that do not fit (shared memory, registers).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm, bn, w, s in [
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3),
        (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4), (128, 32, 4, 4),
        (256, 64, 8, 3),  # long sequences on Hopper: 0.79x -> 0.81-0.84x of cuDNN at 33k tokens
    ]
]
INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}  # small: the interpreter pays per element


# Hopper, head dim 128: one tile. It was the fastest of the list above at 4608 / 33660 / 67320
# tokens in two runs (H100: 0.77-0.79x / 0.87x / 0.89x of cuDNN), while the autotuner's short
# timing picked 128x64 at 33660 tokens in one of them (0.83x), 4% slower, and its tuning costs
# seconds per sequence length. Other GPUs and head dims keep the autotuner.
_HOPPER_HEAD_DIM_128 = [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3)]


@functools.lru_cache(maxsize=None)
def _autotuned(hopper_head_dim_128: bool = False):
    configs = _HOPPER_HEAD_DIM_128 if hopper_head_dim_128 else _GPU_CONFIGS
    return triton.autotune(configs=configs, key=["HEAD_DIM", "HAS_BIAS", "seq_bucket"])(flash_attention_kernel)


def seq_bucket(seq_q: int, seq_k: int) -> int:
    """Retune once per power of two of the sequence, not for every length a ring block has."""
    return 1 << max(seq_q, seq_k, 1).bit_length()


def launch_flash_attention(q, k, v, bias, scale: float):
    """Run the kernel; inputs already checked by `_runtime.unsupported_reason`."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else lse  # any pointer: never read without HAS_BIAS
    stride_bias_b = (bias.stride(0) if bias.shape[0] > 1 else 0) if has_bias else 0
    stride_bias_s = bias.stride(3) if has_bias else 0
    args = (
        q, k, v, bias_arg, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_bias_b, stride_bias_s,
        heads, seq_q, seq_k, scale * LOG2E, seq_bucket(seq_q, seq_k),
    )

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]), batch * heads)

    if interpreting():
        flash_attention_kernel[grid](
            *args, HEAD_DIM=head_dim, HAS_BIAS=has_bias, UPCAST_DOT=True, **INTERPRETER_BLOCKS
        )
    else:
        hopper_128 = device_capability(q.device)[0] == 9 and head_dim == 128
        _autotuned(hopper_128)[grid](*args, HEAD_DIM=head_dim, HAS_BIAS=has_bias, UPCAST_DOT=False)
    return out, lse


def flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int) -> float:
    """Matmul FLOPs of one forward (QK^T and PV), the usual TFLOP/s numerator."""
    return 4.0 * batch * heads * seq_q * seq_k * head_dim


__all__ = ["biased_masked_scores", "launch_flash_attention", "flash_attention_kernel", "flops"]
