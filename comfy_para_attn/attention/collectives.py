"""Collectives for the attention paths: functional collectives under torch.compile (so the
graph captures them), plain c10d calls in eager mode (less Python per call: the eager
path of a DiT step is often bound by launch overhead once its work is split over GPUs)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor

# torch >= 2.13 renames all_gather_tensor (any dim) to all_gather_single (dim 0).
_gather_dim0 = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
# Eager c10d: torch 2.14 deprecates all_gather_into_tensor in favour of all_gather_single.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_groups: dict[str, dist.ProcessGroup] = {}


def process_group(name: str) -> dist.ProcessGroup:
    group = _groups.get(name)
    if group is None:
        from torch.distributed.distributed_c10d import _resolve_process_group

        group = _groups[name] = _resolve_process_group(name)
    return group


_gloo_groups: dict = {}


def cpu_group(group=None):
    """A gloo group over the same ranks as `group` (the default group when None), for CPU
    tensors; created once per group (collective: every rank must call this together)."""
    if dist.get_backend(group) == "gloo":
        return group
    key = id(group)
    if key not in _gloo_groups:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        _gloo_groups[key] = dist.new_group(ranks=ranks, backend="gloo")
    return _gloo_groups[key]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def start_all_to_all(x: Tensor, out_splits: Optional[Sequence[int]], in_splits: Optional[Sequence[int]],
                     group: str):
    """Begin an all-to-all along dim 0; `finish(handle)` returns the received tensor.
    Work issued between the two overlaps with the transfer."""
    if _compiling():
        return fc.all_to_all_single(x, out_splits, in_splits, group), None
    x = x.contiguous()
    rows = x.shape[0] if out_splits is None else sum(out_splits)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(out, x, list(out_splits) if out_splits is not None else None,
                                  list(in_splits) if in_splits is not None else None,
                                  group=process_group(group), async_op=True)
    return out, work


def finish(handle) -> Tensor:
    out, work = handle
    if work is not None:
        work.wait()
    return out


def all_to_all(x: Tensor, out_splits, in_splits, group: str) -> Tensor:
    return finish(start_all_to_all(x, out_splits, in_splits, group))


def start_all_gather(x: Tensor, group: str):
    """Begin concatenating every rank's `x` along dim 0 (same shape on every rank);
    `finish(handle)` returns the result."""
    x = x.contiguous()
    if _compiling():
        return _gather_dim0(x, 0, group), None
    pg = process_group(group)
    gathered = x.new_empty((x.shape[0] * pg.size(),) + tuple(x.shape[1:]))
    return gathered, _gather_into(gathered, x, group=pg, async_op=True)


def all_gather(x: Tensor, dim: int, group: str) -> Tensor:
    """Concatenate every rank's `x` along `dim` (same shape on every rank)."""
    gathered = finish(start_all_gather(x.movedim(dim, 0) if dim else x, group))
    return gathered.movedim(0, dim) if dim else gathered


def all_reduce(x: Tensor, op: str, group: str) -> Tensor:
    if _compiling():
        return fc.all_reduce(x, op, group)
    x = x.clone()
    dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=process_group(group))
    return x
