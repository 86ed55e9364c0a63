"""RMSNorm then rotary embedding of attention queries or keys, in one pass, the sequence
possibly in two pieces (FLUX's double blocks normalize text and image queries with their
own weights, then concatenate them along the sequence before the rotation).

    rms_norm_rope(pieces, weights, pe, eps, seq_major=False) -> [B, H, sum(S_i), D] bf16
    rms_norm_rope_pair(q_pieces, k_pieces, q_weights, k_weights, pe, eps, seq_major=False) -> (q, k)

The output is contiguous, or with `seq_major` a [B, S, H, D] buffer seen as [B, H, S, D]:
attention then writes its output that way too, and the `transpose(1, 2).reshape` ComfyUI puts
after it is a view instead of a copy (FLUX.1-dev step, H100: a 16 us copy per single block).

Each piece is [B, H, S_i, D] bf16 with any strides but the last (the q/k/v split of a qkv
projection is a strided view), each weight [D]; `pe` is FLUX's fp32 rotation table
[B or 1, 1, S, D/2, 2, 2]. The computation is ComfyUI's: `rms_norm(piece, (D,), weight,
eps)` rounded to bf16, the pieces concatenated, then in fp32 out[2i + r] = pe[i, r, 0] *
x[2i] + pe[i, r, 1] * x[2i + 1], rounded to bf16. Under torch.compile inductor made this
four to six passes per block (FLUX.1-dev fp8 step on an H100: 3.0 ms for the single blocks,
3.3 ms for the double blocks); `comfy_para_attn.rope_fold` puts this op in its place, and
the pair op where a block's q and k share the table: the kernel reads the table (in FLUX as
many bytes per token as four heads of queries) once per token for all heads of both.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .fp8_rowwise import _HAVE_TRITON, _HAVE_TRITON_OP, quantizes_here


def rms_norm_rope_reference(pieces: list[Tensor], weights: list[Tensor], pe: Tensor, eps: float) -> Tensor:
    """The plain-torch computation (see the module docstring)."""
    normed = [torch.nn.functional.rms_norm(p, (p.shape[-1],), w, eps) for p, w in zip(pieces, weights)]
    x = torch.cat(normed, dim=2) if len(normed) > 1 else normed[0]
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
    return out.reshape(x.shape).to(x.dtype)


def why_not_triton(pieces: list[Tensor], weights: list[Tensor], pe: Tensor) -> str | None:
    """None when the Triton kernel can take these inputs, else the reason."""
    if not (_HAVE_TRITON and _HAVE_TRITON_OP):
        return "triton (and torch.library.triton_op) are needed"
    if len(pieces) not in (1, 2) or len(weights) != len(pieces):
        return f"{len(pieces)} pieces (the kernel takes one or two)"
    first = pieces[0]
    if not quantizes_here(first):
        return f"tensors on {first.device.type}"
    batch, heads, _, dim = first.shape if first.ndim == 4 else (0, 0, 0, 0)
    if dim not in (64, 128) and not (dim >= 16 and dim & (dim - 1) == 0):
        return f"head dim {dim} (a power of two from 16)"
    for p, w in zip(pieces, weights):
        if p.dtype != torch.bfloat16 or p.ndim != 4 or p.shape[:2] != (batch, heads) or p.shape[3] != dim:
            return f"piece {tuple(p.shape)} {p.dtype} (bf16 [B, H, S, D] pieces of one batch and head count)"
        if p.stride(3) != 1:
            return "a piece's head dim is strided"
        if w.shape != (dim,) or w.dtype != torch.bfloat16 or not w.is_contiguous():
            return f"weight {tuple(w.shape)} {w.dtype}"
    seq = sum(p.shape[2] for p in pieces)
    if (pe.dtype != torch.float32 or pe.ndim != 6 or pe.shape[0] not in (1, batch) or pe.shape[1] != 1
            or tuple(pe.shape[2:]) != (seq, dim // 2, 2, 2) or not pe[0].is_contiguous()):
        return f"pe {tuple(pe.shape)} {pe.dtype} (fp32 [B or 1, 1, {seq}, {dim // 2}, 2, 2])"
    return None


def _laid_out(x: Tensor, seq_major: bool) -> Tensor:
    return x.transpose(1, 2).contiguous().transpose(1, 2) if seq_major else x


def rms_norm_rope(pieces: list[Tensor], weights: list[Tensor], pe: Tensor, eps: float,
                  seq_major: bool = False) -> Tensor:
    """The Triton kernel where it can run (`why_not_triton`), the plain computation elsewhere."""
    if why_not_triton(pieces, weights, pe) is None:
        from . import triton_qk_norm_rope  # noqa: F401  registers the op

        head, tail = pieces[0], pieces[-1]
        return torch.ops.para_attn.rms_norm_rope(head, tail, weights[0], weights[-1], pe, eps, len(pieces) == 2,
                                                 seq_major)
    return _laid_out(rms_norm_rope_reference(pieces, weights, pe, eps), seq_major)


def why_not_triton_pair(q_pieces, k_pieces, q_weights, k_weights, pe) -> str | None:
    """None when the pair kernel can take q and k together, else the reason."""
    reason = why_not_triton(q_pieces, q_weights, pe) or why_not_triton(k_pieces, k_weights, pe)
    if reason is None and [tuple(p.shape) for p in q_pieces] != [tuple(p.shape) for p in k_pieces]:
        reason = "q and k pieces of different shapes"
    return reason


def rms_norm_rope_pair(q_pieces: list[Tensor], k_pieces: list[Tensor], q_weights: list[Tensor],
                       k_weights: list[Tensor], pe: Tensor, eps: float, seq_major: bool = False) -> tuple[Tensor, Tensor]:
    """`rms_norm_rope` of q and of k, in one kernel where it can run."""
    if why_not_triton_pair(q_pieces, k_pieces, q_weights, k_weights, pe) is None:
        from . import triton_qk_norm_rope  # noqa: F401  registers the op

        return torch.ops.para_attn.rms_norm_rope_pair(q_pieces[0], q_pieces[-1], k_pieces[0], k_pieces[-1],
                                                      q_weights[0], q_weights[-1], k_weights[0], k_weights[-1], pe,
                                                      eps, len(q_pieces) == 2, seq_major)
    return (_laid_out(rms_norm_rope_reference(q_pieces, q_weights, pe, eps), seq_major),
            _laid_out(rms_norm_rope_reference(k_pieces, k_weights, pe, eps), seq_major))
