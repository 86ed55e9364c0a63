"""Small functional-collective helpers that work across the torch versions we support."""
from __future__ import annotations

import torch.distributed._functional_collectives as fc
from torch import Tensor

# torch >= 2.13 renames all_gather_tensor (any dim) to all_gather_single (dim 0).
_gather_dim0 = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor


def all_gather(x: Tensor, dim: int, group: str) -> Tensor:
    """Concatenate every rank's `x` along `dim` (same shape on every rank)."""
    if dim == 0:
        return _gather_dim0(x.contiguous(), 0, group)
    gathered = _gather_dim0(x.movedim(dim, 0).contiguous(), 0, group)
    return gathered.movedim(0, dim)
