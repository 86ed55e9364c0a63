"""Parallel attention in three phases, so a block can put independent work under the
communication (the parallel-MLP blocks of FLUX and HunyuanVideo have a GEMM on each side):

    pending = PhasedAttention(q, k, v, cp=cp, seq_lens=...)  # the exchange starts
    ... work that does not need attention (the MLP input GEMM) ...
    pending.attend()                                          # local kernel; output starts back
    ... more such work (the MLP output GEMM) ...
    out = pending.result()                                    # [B, H, S_local, D]

What travels in the first phase:
- Ulysses (with or without ring): q, k and v in one all-to-all (the ring, if any, runs in
  `attend` with its own overlap); the output's all-to-all runs in the second gap.
- Ring alone: k and v are all-gathered over the ring, then one kernel attends to the whole
  sequence: no log-sum-exp merge and no split kernels, at the cost of holding the whole
  sequence's k and v (the same bytes a ring moves; 2 x 113 MB for HunyuanVideo 544p).

The answer equals `parallel_attention` up to summation order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .collectives import finish, start_all_gather
from .config import ParallelContext
from .local import key_padding_bias, local_attention
from .parallel import plan_sequence, ring_or_local
from .ulysses import finish_gather_heads, finish_scatter_heads, start_gather_heads, start_scatter_heads


class PhasedAttention:
    def __init__(self, q: Tensor, k: Tensor, v: Tensor, *, cp: Optional[ParallelContext],
                 mask: Optional[Tensor] = None, seq_lens: Optional[Sequence[int]] = None,
                 scale: Optional[float] = None):
        self.q, self.cp, self.scale = q, cp, scale
        self.bias = key_padding_bias(mask, q.dtype)
        self.out: Optional[Tensor] = None
        self.returning = None
        if cp is None or cp.config.sequence_size == 1:
            self.mode, self.kv = "local", (k, v)
            return
        self.plan = plan_sequence(q, self.bias, cp, seq_lens)
        if cp.config.ulysses > 1:
            self.mode = "ulysses"
            batch, heads, seq, dim = q.shape
            world = cp.config.ulysses
            qkv = torch.cat([q, k, v], dim=0).view(3 * batch, world, heads // world, seq, dim)
            self.pending = start_scatter_heads(qkv, cp.ulysses_group, self.plan.ulysses_lens)
        else:
            self.mode = "gathered"
            longest = max(self.plan.block_lens)
            # Sequence-major [S, 2, B, H, D]: the gathered k and v are views, no copy.
            kv = torch.stack([k, v]).permute(3, 0, 1, 2, 4)
            if kv.shape[0] < longest:  # uneven shards: padded for the transfer, trimmed after
                kv = torch.cat([kv, kv.new_zeros((longest - kv.shape[0],) + tuple(kv.shape[1:]))])
            self.pending = start_all_gather(kv, cp.ring_group)

    def attend(self) -> None:
        """Wait for the exchange and run the local kernel (the output starts back, for Ulysses)."""
        if self.mode == "local":
            self.out = local_attention(self.q, *self.kv, self.bias, self.scale)[0]
        elif self.mode == "gathered":
            kv = finish(self.pending)
            lens = self.plan.block_lens
            if len(set(lens)) > 1:
                longest = max(lens)
                kv = torch.cat([kv[i * longest : i * longest + n] for i, n in enumerate(lens)])
            k, v = (t.permute(1, 2, 0, 3) for t in kv.unbind(1))  # [B, H, S_all, D] views
            self.out = local_attention(self.q, k, v, self.bias, self.scale)[0]
        else:
            batch = self.q.shape[0]
            q, k, v = finish_scatter_heads(self.pending).split(batch, dim=0)
            out = ring_or_local(q, k, v, self.cp, self.plan, self.bias, self.scale)
            self.returning = start_gather_heads(out, self.cp.ulysses_group, self.plan.ulysses_lens,
                                                self.cp.ulysses_rank)
        self.pending = None

    def result(self) -> Tensor:
        if self.returning is not None:
            self.out, self.returning = finish_gather_heads(self.returning), None
        return self.out
