"""Ring attention: K/V blocks travel around the ring group; partial outputs merge by
log-sum-exp in fp32.

The next block's transfer is issued before the current block is computed, so (with async
functional collectives, eager or compiled) communication overlaps compute.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .collectives import finish, start_all_to_all
from .local import local_attention


def _shift(kv: Tensor, group: str, rank: int, block_lens: Sequence[int], step: int, rows_per_token: int) -> Tensor:
    """Send our current block to the next ring rank, receive the previous rank's.

    At `step` this rank holds the block that originated at `(rank - step) % R`; it sends it
    to `rank + 1` and receives the block of origin `(rank - step - 1) % R`. An all-to-all
    with one non-empty split each way keeps it a functional collective.
    """
    world = len(block_lens)
    dim = kv.shape[-1]
    send_rows = [0] * world
    recv_rows = [0] * world
    send_rows[(rank + 1) % world] = kv.numel() // dim
    recv_rows[(rank - 1) % world] = block_lens[(rank - step - 1) % world] * rows_per_token
    return start_all_to_all(kv.reshape(-1, dim), recv_rows, send_rows, group)


def merge_partial(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor, need_lse: bool = True):
    """Combine two softmax-normalised partial results over disjoint key sets (fp32).

    new_lse = logaddexp(lse, block_lse); the block's weight exp(block_lse - new_lse) is
    sigmoid(block_lse - lse), which needs fewer kernels and never overflows. The last merge
    of a ring skips the lse (`need_lse=False` returns None for it)."""
    weight = torch.sigmoid(block_lse - lse)
    out = torch.lerp(out, block_out.float(), weight.unsqueeze(-1))
    if not need_lse:
        return out, None
    lse = lse - torch.nn.functional.logsigmoid(lse - block_lse)
    return out, lse


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: str,
    rank: int,
    block_lens: Sequence[int],
    bias: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """q, k, v [B, H, S_rank, D] with S_rank = block_lens[rank]; `bias` is the additive key
    bias [B, 1, 1, sum(block_lens)] over the whole ring sequence (or None)."""
    world = len(block_lens)
    batch, heads, _, dim = k.shape
    offsets = [sum(block_lens[:i]) for i in range(world)]
    rows_per_token = 2 * batch * heads  # k and v travel together
    kv = torch.cat([k.reshape(-1, dim), v.reshape(-1, dim)], dim=0)
    out = lse = None
    for step in range(world):
        origin = (rank - step) % world
        n = block_lens[origin]
        pending = _shift(kv, group, rank, block_lens, step, rows_per_token) if step + 1 < world else None
        k_blk, v_blk = kv.split(batch * heads * n, dim=0)
        k_blk = k_blk.reshape(batch, heads, n, dim)
        v_blk = v_blk.reshape(batch, heads, n, dim)
        blk_bias = None if bias is None else bias[..., offsets[origin] : offsets[origin] + n]
        blk_out, blk_lse = local_attention(q, k_blk, v_blk, blk_bias, scale)
        if out is None:
            out, lse = blk_out.float(), blk_lse
        else:
            out, lse = merge_partial(out, lse, blk_out, blk_lse, need_lse=step + 1 < world)
        if pending is not None:
            kv = finish(pending)
    return out.to(q.dtype)
