"""Ring attention: K/V blocks travel around the ring group; partial outputs merge by
log-sum-exp in fp32.

The next block's transfer is issued before the current block is computed, so (with async
functional collectives, eager or compiled) communication overlaps compute.

A ring of two with short blocks takes another way: gather both ranks' K/V, then one
kernel over all keys. There the transfer takes about as long as the local block's attention,
so overlapping it hides little, while two half-size kernels, the NCCL kernel taking SMs from
the first one, and the merge cost more (FLUX at 1024x1024, 2304 tokens a rank, 2 H200s,
three A/B runs: 2.0-2.2 ms a step less). The gather lands in the global key order, token-
major, and the kernel reads K and V from it as strided views: nothing is unpacked. With
`PARA_ATTN_RING_FETCH_CHUNKS` = C > 1 the heads travel in C groups, each issued up front, and
attention on one group runs while the next travels. Long blocks (video) measured the same
either way and keep the overlap, which needs no full-size K/V buffer.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .collectives import finish, start_all_gather, start_all_to_all
from .config import env_int
from .local import local_attention

# A ring of two whose largest block has at most this many tokens fetches the other block
# and runs one kernel (see above); 0 always overlaps. Read at import.
GATHER_MAX_TOKENS = env_int("PARA_ATTN_RING_GATHER_TOKENS", 4096)
# Head groups that gather is pipelined over (see above). Read at import.
FETCH_CHUNKS = env_int("PARA_ATTN_RING_FETCH_CHUNKS", 1, minimum=1)


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
    of a ring skips the lse (`need_lse=False` returns None for it). logaddexp, not
    `lse - logsigmoid(lse - block_lse)`: after fully masked blocks lse is ~-1.7e38 and that
    form cancels to 0 in fp32 instead of giving block_lse."""
    weight = torch.sigmoid(block_lse - lse)
    out = torch.lerp(out, block_out.float(), weight.unsqueeze(-1))
    if not need_lse:
        return out, None
    return out, torch.logaddexp(lse, block_lse)


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
    if world == 2 and max(block_lens) <= GATHER_MAX_TOKENS:
        return _gather_then_attend(q, k, v, group, block_lens, bias, scale, FETCH_CHUNKS)
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


def head_groups(heads: int, chunks: int) -> list[tuple[int, int]]:
    """`chunks` (at most `heads`) contiguous head ranges, the first ones one head larger."""
    chunks = max(1, min(chunks, heads))
    base, extra = divmod(heads, chunks)
    bounds, start = [], 0
    for i in range(chunks):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _start_key_gather(k: Tensor, v: Tensor, group: str, block_lens: Sequence[int]):
    """Begin gathering every ring rank's k and v ([B, h, n_rank, D]) into rows [S, 2, B, h, D]:
    token-major, so the blocks of the ranks in rank order are the global key order.

    Equal blocks go by all-gather. Uneven ones by an all-to-all in which each rank sends its
    block to every rank, itself included; on 2 H200s that was slower for equal blocks (FLUX:
    14.9 ms of NCCL kernels a step against 9.5-11.0 for the all-gather, whose NCCL kernel
    copies our own block itself)."""
    rows = torch.stack([k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)], dim=1).flatten(1)
    if len(set(block_lens)) == 1:
        return start_all_gather(rows, group)
    world = len(block_lens)
    return start_all_to_all(rows.repeat(world, 1), list(block_lens), [rows.shape[0]] * world, group)


def _gather_then_attend(q, k, v, group, block_lens, bias, scale, chunks) -> Tensor:
    """Every rank of the ring gets all keys in global order (so `bias` applies as it is),
    then one kernel over them per head group; no merge."""
    batch, _, _, dim = k.shape
    groups = head_groups(k.shape[1], chunks)
    pending = [_start_key_gather(k[:, a:b], v[:, a:b], group, block_lens) for a, b in groups]
    outs = []
    for (a, b), handle in zip(groups, pending):
        rows = finish(handle).view(-1, 2, batch, b - a, dim)
        keys, values = (rows[:, i].permute(1, 2, 0, 3) for i in (0, 1))  # [B, h, S, D] views
        outs.append(local_attention(q[:, a:b], keys, values, bias, scale)[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
