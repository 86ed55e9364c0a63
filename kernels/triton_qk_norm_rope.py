"""Triton kernel of `kernels.qk_norm_rope` (imported only where triton is)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._runtime import interpreting
from .triton_fp8_rowwise import _round_to_bf16

BLOCK_S = 16  # tokens per program (bench/bench_qk_norm_rope.py --sweep: 16 tokens x 4 heads, 4 warps was best on an H100)
HEADS_PER_PROGRAM = 4  # one load of the rotation table serves this many heads
NUM_WARPS = 4


@triton.jit
def _rms_norm_rope(head_ptr, tail_ptr, w_head_ptr, w_tail_ptr, pe_ptr, out_ptr,
                   head_b, head_h, head_s, tail_b, tail_h, tail_s, pe_b, heads, head_len, seq, eps,
                   HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr):
    """Tokens [s, s + BLOCK_S) of heads [h, h + BLOCK_H) of one batch: token t < head_len comes
    from `head`, the rest from `tail`; RMSNorm with that piece's weight, rounded to bf16, then
    the rotation in fp32, rounded to bf16, into the contiguous output. The rotation table is
    read once for all BLOCK_H heads (read per head, it was 4x the bytes of the queries)."""
    b = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    hs = tl.program_id(2).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, 2 * HALF)
    in_seq = tokens < seq
    in_head = tokens < head_len
    in_tail = in_seq & (tokens >= head_len)
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
    # pe[b, 0, t, i, r, c]: output 2i + r = pe[.., i, r, 0] * x[2i] + pe[.., i, r, 1] * x[2i + 1]
    pe_cols = tl.arange(0, 4 * HALF)
    pe = tl.load(pe_ptr + b * pe_b + tokens[:, None] * (4 * HALF) + pe_cols[None, :], mask=in_seq[:, None], other=0.0)
    of_even, of_odd = tl.split(tl.reshape(pe, (BLOCK_S, HALF, 2, 2)))  # [.., i, r] for c = 0 and c = 1
    even_from_even, odd_from_even = tl.split(of_even)
    even_from_odd, odd_from_odd = tl.split(of_odd)
    out_even = even_from_even[:, None, :] * even + even_from_odd[:, None, :] * odd
    out_odd = odd_from_even[:, None, :] * even + odd_from_odd[:, None, :] * odd
    out = _round_to_bf16(tl.reshape(tl.join(out_even, out_odd), (BLOCK_S, BLOCK_H, 2 * HALF)), SOFTWARE_ROUNDING)
    tl.store(out_ptr + ((b * heads + h3) * seq + t3) * (2 * HALF) + c3, out.to(out_ptr.dtype.element_ty),
             mask=in_seq[:, None, None] & valid_h)


def _launch(head, tail, w_head, w_tail, pe, eps, two_pieces, launcher):
    # The graph pass checked these on example values; a caller's odd layout is copied, not misread.
    head, tail = (t if t.stride(3) == 1 else t.contiguous() for t in (head, tail))
    w_head, w_tail = w_head.contiguous(), w_tail.contiguous()
    pe = pe if pe[0].is_contiguous() else pe.contiguous()
    batch, heads, head_len, dim = head.shape
    seq = head_len + (tail.shape[2] if two_pieces else 0)
    out = torch.empty((batch, heads, seq, dim), device=head.device, dtype=head.dtype)
    block_h = min(HEADS_PER_PROGRAM, triton.next_power_of_2(heads))
    launcher(_rms_norm_rope)[(triton.cdiv(seq, BLOCK_S), batch, triton.cdiv(heads, block_h))](
        head, tail, w_head, w_tail, pe, out, head.stride(0), head.stride(1), head.stride(2),
        tail.stride(0), tail.stride(1), tail.stride(2), pe.stride(0) if pe.shape[0] > 1 else 0, heads, head_len,
        seq, eps, HALF=dim // 2, BLOCK_S=BLOCK_S, BLOCK_H=block_h, SOFTWARE_ROUNDING=interpreting(),
        num_warps=4 if interpreting() else NUM_WARPS)
    return out


def _fake(head, tail, w_head, w_tail, pe, eps, two_pieces):
    seq = head.shape[2] + (tail.shape[2] if two_pieces else 0)
    return head.new_empty((head.shape[0], head.shape[1], seq, head.shape[3]))


if not interpreting():
    @triton_op("para_attn::rms_norm_rope", mutates_args={})
    def rms_norm_rope(head: torch.Tensor, tail: torch.Tensor, w_head: torch.Tensor, w_tail: torch.Tensor,
                      pe: torch.Tensor, eps: float, two_pieces: bool) -> torch.Tensor:
        return _launch(head, tail, w_head, w_tail, pe, eps, two_pieces, wrap_triton)
else:
    @torch.library.custom_op("para_attn::rms_norm_rope", mutates_args=())
    def rms_norm_rope(head: torch.Tensor, tail: torch.Tensor, w_head: torch.Tensor, w_tail: torch.Tensor,
                      pe: torch.Tensor, eps: float, two_pieces: bool) -> torch.Tensor:
        return _launch(head, tail, w_head, w_tail, pe, eps, two_pieces, lambda kernel: kernel)

    rms_norm_rope.register_fake(_fake)
