"""Shard a ComfyUI DiT's tokens across the sequence group, run every joint attention as
unified Ulysses x Ring attention, and gather the tokens once at the end of the model call.

Everything goes through ComfyUI's extension points (see DESIGN.md "ComfyUI hook points"):
- FLUX: `patches["post_input"]` shards img/txt and their ids, so each rank builds the rope
  `pe` of its own tokens; the last `("single_block", i)` patch gathers.
- HunyuanVideo and Wan: the first `("double_block", 0)` patch shards img/txt plus the
  matching `pe` rows and mask entries; every later block patch hands the block this rank's
  `pe` slice; the last block patch gathers.
- `optimized_attention_override` routes joint self-attention to `parallel_attention`
  while tokens are sharded and leaves every other attention (text refiner, Wan's
  cross-attention to the text) to ComfyUI's own kernel.

Each rank holds a slice of the text tokens and a slice of the image tokens; attention does
not care about key order, so the global key order is simply the shards in rank order, and
the key-padding mask is permuted to match.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import Tensor

from ...attention import ParallelContext, parallel_attention, shard_lengths
from ...attention.collectives import all_gather

log = logging.getLogger("comfy_para_attn")


def gather_sequence(x: Tensor, lens: tuple[int, ...], group: str, dim: int = 1) -> Tensor:
    """All ranks' shards of `x` along `dim`, concatenated in rank order. Uneven shards are
    padded only for the transfer and trimmed after, so the result is exact."""
    longest = max(lens)
    if x.shape[dim] < longest:
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    gathered = all_gather(x, dim, group)
    parts = gathered.split(longest, dim=dim)
    return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lens)], dim=dim)


_said_unsplit: set = set()


def _log_unsplit_once(tokens: int, parts: int) -> None:
    if parts not in _said_unsplit:
        _said_unsplit.add(parts)
        log.info("Context Parallel: a model call with a stream of fewer tokens than its %d ranks (%d tokens in all; "
                 "an area condition cropped at the image's edge makes such calls) runs whole on each rank", parts,
                 tokens)


def _unwrap(t):
    """Newer ComfyUI hands attention tensors in an `AttentionTensorContainer`."""
    return t if isinstance(t, Tensor) else t.take()


class ShardedCall:
    """Per-model-call bookkeeping of one rank: which tokens it holds and the global key
    mask. Shared (not deep-copied) by the patches and the attention override of one model."""

    def __init__(self, cp: ParallelContext):
        self.cp = cp
        self.active = False
        self.unsplit = False  # this model call runs whole on every rank (see `begin`)
        self.seq_lens: tuple[int, ...] = ()
        self.key_mask: Optional[Tensor] = None
        self.pe: Optional[Tensor] = None
        self.vec_rows: Optional[Tensor] = None  # Wan 2.2: the frame of each local token
        self.first_lens: tuple[int, ...] = ()
        self.second_lens: tuple[int, ...] = ()
        self.family = ""
        self.text_first = False  # HunyuanVideo's joint sequence is [txt, img] (newer ComfyUI)
        self.self_attention_next = False  # Wan: the block's next attention is its self-attention
        self.control: Optional[dict] = None  # this model call's ControlNet residuals (FLUX)
        self.whole_control = ("output", -1)  # FLUX: the ControlNet residual of the gathering block
        self.block_patches: dict = {}  # (block type, index) -> our patches there, innermost first

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options
        return self

    @property
    def parts(self) -> int:
        return self.cp.config.sequence_size

    @property
    def rank(self) -> int:
        return self.cp.sequence_rank

    def split(self, x: Tensor, dim: int = 1) -> tuple[Tensor, tuple[int, ...]]:
        lens = shard_lengths(x.shape[dim], self.parts)
        start = sum(lens[: self.rank])
        # A fresh tensor with standard strides: a view into the full tensor (even one that
        # counts as contiguous, at batch 1) would make compiled blocks guard on its strides
        # and compile the first block twice.
        return x.narrow(dim, start, lens[self.rank]).clone(memory_format=torch.contiguous_format), lens

    def begin(self, first: Tensor, second: Tensor, key_mask: Optional[Tensor] = None):
        """Shard two token streams (dim 1); the local sequence is [first_r, second_r].
        `key_mask` [B, len(first)+len(second)] in natural order (first then second) is
        permuted to shard order. Returns the two local shards.

        A stream too short to give every rank a token (ComfyUI's blocks cannot take an empty
        one) leaves the call whole: `unsplit` is set, the streams come back as they are, and
        every rank runs this call as one GPU would. Whole images too small are refused before
        sampling; this is the model call of an area condition cropped at the image's edge."""
        first_r, first_lens = self.split(first)
        second_r, second_lens = self.split(second)
        self.unsplit = any(sum(lens) and min(lens) == 0 for lens in (first_lens, second_lens))
        if self.unsplit:
            self.active = False
            _log_unsplit_once(first.shape[1] + second.shape[1], self.parts)
            return first, second
        self.seq_lens = tuple(a + b for a, b in zip(first_lens, second_lens))
        self.first_lens, self.second_lens = first_lens, second_lens
        self.key_mask = None if key_mask is None else key_mask[:, self.shard_order(first.shape[1], first.device)]
        self.active = True
        return first_r, second_r

    def shard_order(self, n_first: int, device) -> Tensor:
        """Indices of the natural sequence [first..., second...] in shard order."""
        idx, f0, s0 = [], 0, n_first
        for f, s in zip(self.first_lens, self.second_lens):
            idx.append(torch.arange(f0, f0 + f))
            idx.append(torch.arange(s0, s0 + s))
            f0, s0 = f0 + f, s0 + s
        return torch.cat(idx).to(device)

    def local_rows(self, x: Tensor, n_first: int, dim: int) -> Tensor:
        """This rank's rows of a tensor laid out [first..., second...] along `dim` (e.g. pe)."""
        f0 = sum(self.first_lens[: self.rank])
        s0 = n_first + sum(self.second_lens[: self.rank])
        return torch.cat(
            [x.narrow(dim, f0, self.first_lens[self.rank]), x.narrow(dim, s0, self.second_lens[self.rank])], dim=dim
        )

    def gather_stream(self, local: Tensor, which: str) -> Tensor:
        """The full `which` ("first"/"second") stream from a local [first_r, second_r] tensor."""
        nf = self.first_lens[self.rank]
        return self.gather_part(local[:, :nf] if which == "first" else local[:, nf:], which)

    def gather_part(self, part: Tensor, which: str) -> Tensor:
        """The full `which` stream from this rank's share of it alone."""
        if self.cp.sequence_group is None:
            return part
        return gather_sequence(part, self.first_lens if which == "first" else self.second_lens,
                               self.cp.sequence_group)

    def gather_pair(self, out: dict, text_first: bool) -> dict:
        """A double block's output with both streams whole (the last block of a model without
        single blocks: HunyuanVideo 1.5 as ComfyUI detects it)."""
        txt, img = ("first", "second") if text_first else ("second", "first")
        return dict(out, img=self.gather_part(out["img"], img), txt=self.gather_part(out["txt"], txt))

    def end(self):
        self.active = False
        self.key_mask = None
        self.pe = None
        self.vec_rows = None
        self.self_attention_next = False


class ContextParallelAttention:
    """`transformer_options["optimized_attention_override"]`: parallel attention for the
    joint self-attention of sharded tokens, ComfyUI's own kernel for everything else."""

    def __init__(self, call: ShardedCall, previous=None):
        self.call = call
        self.previous = previous  # another pack's override keeps working outside our shards

    def __deepcopy__(self, memo):
        return self

    def _fallback(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        call = self.call
        q, k, v = _unwrap(q), _unwrap(k), _unwrap(v)
        skip_reshape = kwargs.get("skip_reshape", False)
        seq_dim = 2 if skip_reshape else 1
        local = call.seq_lens[call.rank] if call.active else -1
        if call.family == "wan":  # see context_parallel._run_block
            joint, call.self_attention_next = call.self_attention_next, False
        else:
            joint = True
        if not (joint and call.active and q.shape[seq_dim] == local and k.shape[seq_dim] == local):
            return self._fallback(func, (q, k, v, heads) + args, kwargs)
        if skip_reshape:
            qh, kh, vh = q, k, v
        else:
            b, s, _ = q.shape
            qh, kh, vh = (t.view(b, s, heads, -1).transpose(1, 2) for t in (q, k, v))
        out = parallel_attention(qh, kh, vh, mask=call.key_mask, cp=call.cp, seq_lens=call.seq_lens)
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
