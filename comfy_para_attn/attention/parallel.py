"""Unified Ulysses x Ring attention over local sequence shards.

    parallel_attention(q, k, v, mask=..., cp=...)   # q, k, v: [B, H, S_local, D]

1. Ulysses (inner group): one all-to-all turns each rank's sequence shard of all heads
   into the ulysses group's whole sequence of H/U heads (q, k, v travel in one call).
2. Ring (outer group): K/V blocks of that sequence travel the ring; partial outputs merge
   by log-sum-exp in fp32.
3. Ulysses back: one all-to-all returns each rank's own tokens with all heads.

Shard order: the global sequence is the concatenation of the shards in sequence-rank
order (ring-major, ulysses-minor). Attention is invariant to the order of keys, so the
caller may interleave streams (e.g. each rank holds a slice of text *and* image tokens)
as long as every token keeps its own rotary embedding and the mask follows the same order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .config import ParallelContext, env_int
from .local import key_padding_bias, local_attention
from .ring import ring_attention
from .ulysses import ulysses_attention


# Head chunks the Ulysses exchange is pipelined over (communication of one chunk overlaps
# the attention of another). Off (1) by default: on 2 H200s it sped up ComfyUI eager FLUX
# (134 -> 108 ms/step) but slowed compiled blocks (85 -> 134) and diffusers eager.
ULYSSES_CHUNKS = env_int("PARA_ATTN_ULYSSES_CHUNKS", 1, minimum=1)


def shard_lengths(total: int, parts: int) -> tuple[int, ...]:
    """Lengths of `torch.tensor_split(x, parts)`: the first `total % parts` shards are one longer."""
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def shard_sequence(x: Tensor, cp: ParallelContext, dim: int = 1) -> Tensor:
    """This rank's contiguous slice of `x` along `dim` (uneven lengths allowed)."""
    parts = cp.config.sequence_size
    if parts == 1:
        return x
    return torch.tensor_split(x, parts, dim=dim)[cp.sequence_rank]


def parallel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Optional[Tensor] = None,
    cp: Optional[ParallelContext],
    seq_lens: Optional[Sequence[int]] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Attention of this rank's query shard over the whole sequence; returns [B, H, S_local, D].

    `seq_lens`: local length of every rank of the sequence group (static ints); default:
    all equal to this rank's length. `mask`: key mask over the *global* sequence (same
    order as the shards), bool [B, S] with True = attend or additive float; None = no mask
    (an integer mask is a TypeError, as in torch). A batch row whose every key is masked
    gets the mean of V (masked keys weigh a finite -0.5 * max so that no lse is -inf), where
    torch's SDPA returns zeros. `cp` None (or a single-rank layout) runs plain attention.
    """
    bias = key_padding_bias(mask, q.dtype)
    if cp is None or cp.config.sequence_size == 1:
        return local_attention(q, k, v, bias, scale)[0]
    config = cp.config
    ulysses, ring = config.ulysses, config.ring
    if seq_lens is None:
        seq_lens = (q.shape[2],) * config.sequence_size
    seq_lens = tuple(int(s) for s in seq_lens)
    if len(seq_lens) != config.sequence_size or q.shape[2] != seq_lens[cp.sequence_rank]:
        raise ValueError(
            f"seq_lens {seq_lens} do not fit a sequence group of {config.sequence_size} ranks "
            f"where this rank ({cp.sequence_rank}) holds {q.shape[2]} tokens: pass one length per rank of "
            "the sequence group, this rank's equal to q.shape[2]"
        )
    if min(seq_lens) < 1:
        raise ValueError(f"seq_lens {seq_lens}: every rank needs at least one token; use fewer ranks (a smaller "
                         "ulysses x ring) for sequences this short")
    if q.shape[1] % ulysses:
        raise ValueError(f"ulysses degree {ulysses} does not divide the {q.shape[1]} attention heads: use a "
                         "ulysses degree that divides it and move the rest of the factor to ring")
    if bias is not None and bias.shape[-1] != sum(seq_lens):
        raise ValueError(f"mask covers {bias.shape[-1]} keys but the sequence has {sum(seq_lens)} tokens: give "
                         "one mask entry per key of the whole sequence (all ranks' tokens)")

    ring_rank, ulysses_rank = cp.ring_rank, cp.ulysses_rank
    ulysses_lens = seq_lens[ring_rank * ulysses : (ring_rank + 1) * ulysses]
    block_lens = tuple(sum(seq_lens[i * ulysses : (i + 1) * ulysses]) for i in range(ring))

    def attend(q, k, v):
        if ring > 1:
            return ring_attention(
                q, k, v, group=cp.ring_group, rank=ring_rank, block_lens=block_lens, bias=bias, scale=scale
            )
        return local_attention(q, k, v, bias, scale)[0]

    if ulysses == 1:
        return attend(q, k, v)
    return ulysses_attention(q, k, v, attend, group=cp.ulysses_group, seq_lens=ulysses_lens, rank=ulysses_rank,
                             chunks=ULYSSES_CHUNKS)
