"""A sampling run's adaLN modulation rows, computed for every step at once.

FLUX-style DiTs modulate each block with `lin(silu(vec))`, where `vec` is one vector per image
made from the timestep and the conds (pooled text, guidance). The modulation layers are ~27%
of FLUX.1-dev's weights and see one row per image, so each step reads 6.4 GB of bf16 weights
for a few rows of output (H100: 2.9 ms of a 88 ms fp8 step). A run fixes the conds and its
whole timestep schedule up front, so the rows of every step can come from one matmul per
layer of (steps x batch) rows: the weights read once per run instead of once per step.

`ModulationTable` holds those rows with the key (sigma) of each step; `select(keys)` copies
each image's rows for its key into a buffer that the layers (their class given
`TableForward`, an object patch) return while the table is attached, choosing the step on
the GPU, so the host never waits for it. It returns whether some key was not in the table:
the caller must then not use that call's result (the ComfyUI adapter checks once at the end
of a run and samples again without the table). A detached layer computes as before.
"""
from __future__ import annotations

import itertools

import torch

ROWS_ATTR = "para_attn_modulation_rows"


class TableForward:
    """Mixed into a modulation layer's class (`table_class`): while `ROWS_ATTR` holds this
    step's rows [batch, out], the layer returns them instead of computing them. A class, not a
    per-layer callable, so compiled blocks (which guard on what they call) share one graph."""

    para_attn_modulation_rows = None  # ROWS_ATTR: detached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.para_attn_modulation_rows
        if rows is None or rows.shape[0] != x.numel() // x.shape[-1]:  # not the batch it was chosen for
            return super().forward(x)
        return rows.reshape(*x.shape[:-1], rows.shape[-1])


_table_classes: dict = {}


def table_class(cls: type) -> type:
    """`cls` with `TableForward` in front (cached; a class that has it already is returned)."""
    if issubclass(cls, TableForward):
        return cls
    if cls not in _table_classes:
        _table_classes[cls] = type(f"ModulationTable{cls.__name__}", (TableForward, cls),
                                   {"_para_attn_base": getattr(cls, "_para_attn_base", cls), "__module__": __name__})
    return _table_classes[cls]


class ModulationTable:
    """The rows of `layers` for every step of a run. `inputs` [steps, batch, dim] are the
    layers' inputs (silu of each step's vec), computed by the caller; `keys` [steps] name the
    steps (their sigmas)."""

    def __init__(self, layers: list[tuple[str, torch.nn.Module]], inputs: torch.Tensor, keys: torch.Tensor,
                 current: torch.Tensor | None = None):
        steps, batch, dim = inputs.shape
        flat = inputs.reshape(steps * batch, dim)
        self.layers = [module for _, module in layers]
        detach(self.layers)  # the layers' own computation, whatever class they have
        with torch.no_grad():
            outs = [module(flat) for module in self.layers]
        self.widths = [o.shape[-1] for o in outs]
        self.rows = torch.cat(outs, dim=-1).reshape(steps, batch, -1)
        del outs
        self.keys = keys.to(self.rows.device, torch.float32)
        self._images = torch.arange(batch, device=self.rows.device)
        shape = (batch, self.rows.shape[-1])
        fits = (current is not None and tuple(current.shape) == shape and current.dtype == self.rows.dtype
                and current.device == self.rows.device)
        # A kept buffer keeps its address: a CUDA graph of a model call reads the rows there.
        self.current = current if fits else torch.empty(shape, dtype=self.rows.dtype, device=self.rows.device)
        ends = itertools.accumulate(self.widths)
        self._views = [self.current[:, end - width:end] for end, width in zip(ends, self.widths)]

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def select(self, keys: torch.Tensor) -> torch.Tensor:
        """Image b's rows of the step whose key is nearest `keys[b]`, into the buffer the
        attached layers return; on the GPU. Returns a bool tensor: True if some key is not
        one of the table's (that call's rows are then another step's)."""
        keys = keys.to(self.keys.device, torch.float32)
        step = (self.keys[None, :] - keys[:, None]).abs().argmin(dim=1)
        self.current.copy_(self.rows[step, self._images])
        return (self.keys[step] != keys).any()

    def attach(self) -> None:
        # Straight into the instance dicts: nn.Module.__setattr__ costs ~100x more, and this
        # runs twice per layer per model call.
        for module, view in zip(self.layers, self._views):
            module.__dict__[ROWS_ATTR] = view


def detach(layers) -> None:
    for module in layers:
        module.__dict__.pop(ROWS_ATTR, None)
