"""Ulysses: one all-to-all turns sequence shards into head shards and back.

Shards may have different lengths (`seq_lens`, one per rank of the group, static Python
ints); the all-to-all then uses uneven split sizes, so nothing is padded.

`ulysses_attention` pipelines the exchange over head chunks: chunk i+1 travels while
chunk i is attended, and chunk i's output travels back while chunk i+1 is attended, so
most of the communication hides behind the attention kernels.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .collectives import finish, start_all_to_all


def start_scatter_heads(x: Tensor, group: str, seq_lens: Sequence[int]):
    """Begin turning a sequence shard into a head shard: `x` [B, U, H/U, S_rank, D] holds the
    heads bound for rank j at [:, j]; `finish_scatter_heads` returns [B, H/U, sum(seq_lens), D]."""
    batch, world, heads_local, seq, dim = x.shape
    send = x.transpose(0, 1).reshape(-1, dim)  # rows bound for rank j are contiguous
    even = len(set(seq_lens)) == 1
    rows_in = [batch * heads_local * seq] * world
    rows_out = [batch * heads_local * s for s in seq_lens]
    handle = start_all_to_all(send, None if even else rows_out, None if even else rows_in, group)
    return handle, (batch, heads_local, seq, dim, tuple(seq_lens), even)


def finish_scatter_heads(pending) -> Tensor:
    handle, (batch, heads_local, seq, dim, seq_lens, even) = pending
    recv = finish(handle)
    world = len(seq_lens)
    if even:
        recv = recv.reshape(world, batch, heads_local, seq, dim).permute(1, 2, 0, 3, 4)
        return recv.reshape(batch, heads_local, world * seq, dim)
    parts = recv.split([batch * heads_local * s for s in seq_lens], dim=0)
    return torch.cat([p.reshape(batch, heads_local, s, dim) for p, s in zip(parts, seq_lens)], dim=2)


def start_gather_heads(x: Tensor, group: str, seq_lens: Sequence[int], rank: int):
    """Begin the inverse of the scatter: [B, H/U, sum(seq_lens), D] -> [B, H, S_rank, D]."""
    batch, heads_local, _, dim = x.shape
    world = len(seq_lens)
    seq = seq_lens[rank]
    if len(set(seq_lens)) == 1:
        send = x.reshape(batch, heads_local, world, seq, dim).permute(2, 0, 1, 3, 4).reshape(-1, dim)
        handle = start_all_to_all(send, None, None, group)
    else:
        parts = x.split(list(seq_lens), dim=2)
        send = torch.cat([p.reshape(-1, dim) for p in parts], dim=0)
        rows_in = [batch * heads_local * s for s in seq_lens]
        handle = start_all_to_all(send, [batch * heads_local * seq] * world, rows_in, group)
    return handle, (batch, heads_local, world, seq, dim)


def finish_gather_heads(pending) -> Tensor:
    handle, (batch, heads_local, world, seq, dim) = pending
    recv = finish(handle).reshape(world, batch, heads_local, seq, dim).transpose(0, 1)
    return recv.reshape(batch, world * heads_local, seq, dim)


def head_chunks(heads_local: int, wanted: int) -> int:
    """The largest chunk count <= `wanted` that divides this rank's heads."""
    return max(c for c in range(1, max(1, wanted) + 1) if heads_local % c == 0)


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, attend: Callable[[Tensor, Tensor, Tensor], Tensor], *,
                      group: str, seq_lens: Sequence[int], rank: int, chunks: int = 1) -> Tensor:
    """Sequence shards q, k, v [B, H, S_rank, D] -> `attend` on head shards over the whole
    sequence -> this rank's tokens with all heads, pipelined over `chunks` head chunks."""
    batch, heads, seq, dim = q.shape
    world = len(seq_lens)
    chunks = head_chunks(heads // world, chunks)
    per_chunk = heads // world // chunks
    # Chunk c holds heads [j*H/U + c*h, j*H/U + (c+1)*h) of every destination rank j, so its
    # scatter is an ordinary scatter of U*h heads and its output slots back into place.
    qkv = torch.cat([q, k, v], dim=0).view(3 * batch, world, chunks, per_chunk, seq, dim)

    pending = [start_scatter_heads(qkv[:, :, 0], group, seq_lens)]
    returning = []
    for c in range(chunks):
        if c + 1 < chunks:  # issue the next chunk's transfer before this chunk's compute
            pending.append(start_scatter_heads(qkv[:, :, c + 1], group, seq_lens))
        qc, kc, vc = finish_scatter_heads(pending[c]).split(batch, dim=0)
        returning.append(start_gather_heads(attend(qc, kc, vc), group, seq_lens, rank))
    if chunks == 1:
        return finish_gather_heads(returning[0])
    outs = [finish_gather_heads(p).view(batch, world, 1, per_chunk, seq, dim) for p in returning]
    return torch.cat(outs, dim=2).reshape(batch, heads, seq, dim)
