"""Triton kernel of `kernels.qk_norm_rope` (imported only where triton is)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._runtime import interpreting
from .triton_fp8_rowwise import _round_to_bf16

# (tokens per program, heads per step, head slices (0: one step of heads per program), warps).
# bench/bench_qk_norm_rope.py --sweep, H100, a FLUX block's q and k in one call, inputs not in L2:
# 8 tokens x 2 heads a step, one slice, 4 warps: 50.7 us (sequence-major output; 49.7
# heads-major); 16 x 2: 53.6; 4 x 8: 52.1; 16 x 4: 116.8 (an earlier kernel); 16 x 4 in 6
# slices (the table read per 4 heads): 83.6. A single call keeps the grid it was tuned with
# before the pair op (one step of 4 heads per program: 26 us a call, hot).
PAIR_TILE = (8, 2, 1, 4)
SINGLE_TILE = (16, 4, 0, 4)


@triton.jit
def _norm_rotate(head_ptr, tail_ptr, w_head_ptr, w_tail_ptr, out_ptr, head_b, head_h, head_s, tail_b, tail_h,
                 tail_s, out_b, out_h, out_s, b, tokens, hs, in_head, in_tail, in_seq, ee, eo, oe, oo, heads, head_len,
                 eps,
                 HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr):
    """Heads `hs` of tokens `tokens`: token t < head_len comes from `head`, the rest from `tail`;
    RMSNorm with that piece's weight, rounded to bf16, then the rotation (`ee`: even output
    from even input, ...) in fp32, rounded to bf16, into the output (strides `out_*`)."""
    cols = tl.arange(0, 2 * HALF)
    valid_h = (hs < heads)[None, :, None]
    t3, h3, c3 = tokens[:, None, None], hs[None, :, None], cols[None, None, :]
    head = tl.load(head_ptr + b * head_b + h3 * head_h + t3 * head_s + c3, mask=in_head[:, None, None] & valid_h,
                   other=0.0)
    tail = tl.load(tail_ptr + b * tail_b + h3 * tail_h + (t3 - head_len) * tail_s + c3,
                   mask=in_tail[:, None, None] & valid_h, other=0.0)
    x = tl.where(in_head[:, None, None], head, tail).to(tl.float32)
    weight = tl.where(in_head[:, None], tl.load(w_head_ptr + cols)[None, :], tl.load(w_tail_ptr + cols)[None, :])
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=2) / (2 * HALF) + eps)
    normed = _round_to_bf16(x * rstd[:, :, None] * weight.to(tl.float32)[:, None, :], SOFTWARE_ROUNDING)
    even, odd = tl.split(tl.reshape(normed, (BLOCK_S, BLOCK_H, HALF, 2)))
    out_even = ee[:, None, :] * even + eo[:, None, :] * odd
    out_odd = oe[:, None, :] * even + oo[:, None, :] * odd
    out = _round_to_bf16(tl.reshape(tl.join(out_even, out_odd), (BLOCK_S, BLOCK_H, 2 * HALF)), SOFTWARE_ROUNDING)
    tl.store(out_ptr + b * out_b + h3 * out_h + t3 * out_s + c3, out.to(out_ptr.dtype.element_ty),
             mask=in_seq[:, None, None] & valid_h)


@triton.jit
def _rms_norm_rope(q_head_ptr, q_tail_ptr, wq_head_ptr, wq_tail_ptr, q_out_ptr,
                   k_head_ptr, k_tail_ptr, wk_head_ptr, wk_tail_ptr, k_out_ptr, pe_ptr,
                   q_head_b, q_head_h, q_head_s, q_tail_b, q_tail_h, q_tail_s,
                   k_head_b, k_head_h, k_head_s, k_tail_b, k_tail_h, k_tail_s, out_b, out_h, out_s,
                   pe_b, heads, heads_per_slice, head_len, seq, eps,
                   HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, PAIR: tl.constexpr,
                   SOFTWARE_ROUNDING: tl.constexpr):
    """Tokens [s, s + BLOCK_S) of one batch, heads of slice program_id(2), BLOCK_H at a time:
    q, and with PAIR k too. The rotation table (FLUX: 1 KiB per token, as many bytes as four
    heads of bf16 queries) is read once for all of them."""
    # Inductor passes a Python float as fp64, and the norm's math followed it: 212 registers
    # instead of 128, 100.5 against 53.2 us a FLUX block on an H100.
    eps = tl.cast(eps, tl.float32)
    b = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_seq = tokens < seq
    in_head = tokens < head_len
    in_tail = in_seq & (tokens >= head_len)
    # pe[b, 0, t, i, r, c]: output 2i + r = pe[.., i, r, 0] * x[2i] + pe[.., i, r, 1] * x[2i + 1]
    pe_cols = tl.arange(0, 4 * HALF)
    pe = tl.load(pe_ptr + b * pe_b + tokens[:, None] * (4 * HALF) + pe_cols[None, :], mask=in_seq[:, None], other=0.0)
    of_even, of_odd = tl.split(tl.reshape(pe, (BLOCK_S, HALF, 2, 2)))  # [.., i, r] for c = 0 and c = 1
    ee, oe = tl.split(of_even)
    eo, oo = tl.split(of_odd)
    first = tl.program_id(2) * heads_per_slice
    for h in range(first, tl.minimum(first + heads_per_slice, heads), BLOCK_H):
        hs = h + tl.arange(0, BLOCK_H)
        _norm_rotate(q_head_ptr, q_tail_ptr, wq_head_ptr, wq_tail_ptr, q_out_ptr, q_head_b, q_head_h, q_head_s,
                     q_tail_b, q_tail_h, q_tail_s, out_b, out_h, out_s, b, tokens, hs, in_head, in_tail, in_seq, ee,
                     eo, oe, oo, heads, head_len, eps, HALF, BLOCK_S, BLOCK_H, SOFTWARE_ROUNDING)
        if PAIR:
            _norm_rotate(k_head_ptr, k_tail_ptr, wk_head_ptr, wk_tail_ptr, k_out_ptr, k_head_b, k_head_h, k_head_s,
                         k_tail_b, k_tail_h, k_tail_s, out_b, out_h, out_s, b, tokens, hs, in_head, in_tail, in_seq,
                         ee, eo, oe, oo, heads, head_len, eps, HALF, BLOCK_S, BLOCK_H, SOFTWARE_ROUNDING)


def _prepare(head, tail, w_head, w_tail):
    # The graph pass checked these on example values; a caller's odd layout is copied, not misread.
    head, tail = (t if t.stride(3) == 1 else t.contiguous() for t in (head, tail))
    return head, tail, w_head.contiguous(), w_tail.contiguous()


def _output(head, seq: int, seq_major: bool) -> torch.Tensor:
    """[B, H, S, D]; with `seq_major` the strides of a contiguous [B, S, H, D] (what attention
    writes its output in when its query is so: the `transpose(1, 2).reshape` after it is then
    a view, not a copy)."""
    batch, heads, _, dim = head.shape
    if seq_major:
        return head.new_empty((batch, seq, heads, dim)).transpose(1, 2)
    return head.new_empty((batch, heads, seq, dim))


def _launch(q, k, pe, eps, two_pieces, seq_major, launcher):
    """q = (head, tail, w_head, w_tail); k the same, or None: the outputs, [B, H, S, D] each."""
    q = _prepare(*q)
    k = _prepare(*k) if k is not None else None
    pe = pe if pe[0].is_contiguous() else pe.contiguous()
    head = q[0]
    batch, heads, head_len, dim = head.shape
    seq = head_len + (q[1].shape[2] if two_pieces else 0)
    q_out = _output(head, seq, seq_major)
    k_out = _output(head, seq, seq_major) if k is not None else q_out
    block_s, heads_per_step, slices, warps = PAIR_TILE if k is not None else SINGLE_TILE
    block_h = min(heads_per_step, triton.next_power_of_2(heads))
    steps = triton.cdiv(heads, block_h)
    slices = steps if slices == 0 else max(1, min(slices, steps))
    per_slice = triton.cdiv(steps, slices) * block_h
    ks = k if k is not None else q
    launcher(_rms_norm_rope)[(triton.cdiv(seq, block_s), batch, triton.cdiv(heads, per_slice))](
        q[0], q[1], q[2], q[3], q_out, ks[0], ks[1], ks[2], ks[3], k_out, pe,
        q[0].stride(0), q[0].stride(1), q[0].stride(2), q[1].stride(0), q[1].stride(1), q[1].stride(2),
        ks[0].stride(0), ks[0].stride(1), ks[0].stride(2), ks[1].stride(0), ks[1].stride(1), ks[1].stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        pe.stride(0) if pe.shape[0] > 1 else 0, heads, per_slice, head_len, seq, eps,
        HALF=dim // 2, BLOCK_S=block_s, BLOCK_H=block_h, PAIR=k is not None, SOFTWARE_ROUNDING=interpreting(),
        num_warps=4 if interpreting() else warps)
    return (q_out, k_out) if k is not None else q_out


def _fake(head, tail, w_head, w_tail, pe, eps, two_pieces, seq_major):
    return _output(head, head.shape[2] + (tail.shape[2] if two_pieces else 0), seq_major)


def _fake_pair(q_head, q_tail, k_head, k_tail, wq_head, wq_tail, wk_head, wk_tail, pe, eps, two_pieces, seq_major):
    return (_fake(q_head, q_tail, wq_head, wq_tail, pe, eps, two_pieces, seq_major),
            _fake(k_head, k_tail, wk_head, wk_tail, pe, eps, two_pieces, seq_major))


def _single(head, tail, w_head, w_tail, pe, eps, two_pieces, seq_major, launcher):
    return _launch((head, tail, w_head, w_tail), None, pe, eps, two_pieces, seq_major, launcher)


def _pair(q_head, q_tail, k_head, k_tail, wq_head, wq_tail, wk_head, wk_tail, pe, eps, two_pieces, seq_major,
          launcher):
    return _launch((q_head, q_tail, wq_head, wq_tail), (k_head, k_tail, wk_head, wk_tail), pe, eps, two_pieces,
                   seq_major, launcher)


if not interpreting():
    @triton_op("para_attn::rms_norm_rope", mutates_args={})
    def rms_norm_rope(head: torch.Tensor, tail: torch.Tensor, w_head: torch.Tensor, w_tail: torch.Tensor,
                      pe: torch.Tensor, eps: float, two_pieces: bool, seq_major: bool) -> torch.Tensor:
        return _single(head, tail, w_head, w_tail, pe, eps, two_pieces, seq_major, wrap_triton)

    @triton_op("para_attn::rms_norm_rope_pair", mutates_args={})
    def rms_norm_rope_pair(q_head: torch.Tensor, q_tail: torch.Tensor, k_head: torch.Tensor, k_tail: torch.Tensor,
                           wq_head: torch.Tensor, wq_tail: torch.Tensor, wk_head: torch.Tensor,
                           wk_tail: torch.Tensor, pe: torch.Tensor, eps: float, two_pieces: bool,
                           seq_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _pair(q_head, q_tail, k_head, k_tail, wq_head, wq_tail, wk_head, wk_tail, pe, eps, two_pieces, seq_major,
                     wrap_triton)
else:
    @torch.library.custom_op("para_attn::rms_norm_rope", mutates_args=())
    def rms_norm_rope(head: torch.Tensor, tail: torch.Tensor, w_head: torch.Tensor, w_tail: torch.Tensor,
                      pe: torch.Tensor, eps: float, two_pieces: bool, seq_major: bool) -> torch.Tensor:
        return _single(head, tail, w_head, w_tail, pe, eps, two_pieces, seq_major, lambda kernel: kernel)

    @torch.library.custom_op("para_attn::rms_norm_rope_pair", mutates_args=())
    def rms_norm_rope_pair(q_head: torch.Tensor, q_tail: torch.Tensor, k_head: torch.Tensor, k_tail: torch.Tensor,
                           wq_head: torch.Tensor, wq_tail: torch.Tensor, wk_head: torch.Tensor,
                           wk_tail: torch.Tensor, pe: torch.Tensor, eps: float, two_pieces: bool,
                           seq_major: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return _pair(q_head, q_tail, k_head, k_tail, wq_head, wq_tail, wk_head, wk_tail, pe, eps, two_pieces, seq_major,
                     lambda kernel: kernel)

    rms_norm_rope.register_fake(_fake)
    rms_norm_rope_pair.register_fake(_fake_pair)
