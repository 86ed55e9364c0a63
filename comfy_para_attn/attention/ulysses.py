"""Ulysses: one all-to-all turns sequence shards into head shards and back.

Shards may have different lengths (`seq_lens`, one per rank of the group, static Python
ints); the all-to-all then uses uneven split sizes, so nothing is padded.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .collectives import all_to_all


def scatter_heads(x: Tensor, group: str, seq_lens: Sequence[int], rank: int) -> Tensor:
    """[B, H, S_rank, D] sequence shard -> [B, H/U, sum(seq_lens), D] head shard."""
    batch, heads, seq, dim = x.shape
    world = len(seq_lens)
    heads_local = heads // world
    # Rows bound for rank j are contiguous: [U, B, H/U, S, D].
    send = x.reshape(batch, world, heads_local, seq, dim).transpose(0, 1).reshape(-1, dim)
    rows_in = [batch * heads_local * seq] * world
    rows_out = [batch * heads_local * s for s in seq_lens]
    if len(set(seq_lens)) == 1:
        recv = all_to_all(send, None, None, group)
        recv = recv.reshape(world, batch, heads_local, seq, dim).permute(1, 2, 0, 3, 4)
        return recv.reshape(batch, heads_local, world * seq, dim)
    recv = all_to_all(send, rows_out, rows_in, group)
    parts = recv.split(rows_out, dim=0)
    return torch.cat([p.reshape(batch, heads_local, s, dim) for p, s in zip(parts, seq_lens)], dim=2)


def gather_heads(x: Tensor, group: str, seq_lens: Sequence[int], rank: int) -> Tensor:
    """Inverse of `scatter_heads`: [B, H/U, sum(seq_lens), D] -> [B, H, S_rank, D]."""
    batch, heads_local, _, dim = x.shape
    world = len(seq_lens)
    seq = seq_lens[rank]
    rows_in = [batch * heads_local * s for s in seq_lens]
    rows_out = [batch * heads_local * seq] * world
    if len(set(seq_lens)) == 1:
        send = x.reshape(batch, heads_local, world, seq, dim).permute(2, 0, 1, 3, 4).reshape(-1, dim)
        recv = all_to_all(send, None, None, group)
    else:
        parts = x.split(list(seq_lens), dim=2)
        send = torch.cat([p.reshape(-1, dim) for p in parts], dim=0)
        recv = all_to_all(send, rows_out, rows_in, group)
    recv = recv.reshape(world, batch, heads_local, seq, dim).transpose(0, 1)
    return recv.reshape(batch, world * heads_local, seq, dim)
