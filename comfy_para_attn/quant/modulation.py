"""The adaLN modulation layers of FLUX-style DiTs with int8 weights (`kernels.int8_linear`).

FP8 Quantize keeps these layers out of fp8 (`DEFAULT_EXCLUDE`): they see one row per image,
so fp8 matmuls gain nothing. But a matmul of one row is a pass over the weight, and these
layers are ~27% of FLUX.1-dev's weights: 6.4 GB of bf16 read at every step. With int8
weights and a per-row scale the pass reads half of that, at ~1% weight error (fp8 e4m3's is
~4x that). Measured on an H100 (FLUX.1-dev size, fp8 + Compile Model): the layers' GPU time
2.46 -> 1.9 ms a step, but the whole step unchanged (91.3 against 91.3 ms in one run; +-1 ms
across runs), 3.0 GiB less GPU memory held (14.5 -> 11.5 GiB), 1-3 s more compile. So it is
FP8 Quantize's opt-in `modulation="int8"`, for memory, not the default.

Where: the linear layers whose names match `MODULATION_PATTERNS` (FLUX / HunyuanVideo
`img_mod.lin`, `txt_mod.lin`, single blocks' `modulation.lin`, the final layer's
`adaLN_modulation`) and that the fp8 exclude patterns keep out of fp8. Each such layer's
class becomes a subclass of its own (with `Int8Forward`, an object patch ComfyUI applies at
every load and undoes) whose forward takes the int8 path while its weight is int8 and is the
layer's own otherwise; `to_int8` converts the loaded, patch-merged weight in place.
"""
from __future__ import annotations

from typing import Iterable

import torch

from comfy_para_attn.kernels.int8_linear import int8_linear, quantize_weight_int8

from .fp8 import is_excluded
from .layer_classes import mixed_class

MODULATION_PATTERNS = ("*_mod.lin", "*modulation.lin", "*adaLN_modulation.*",
                       "*modulation_img.lin", "*modulation_txt.lin")  # FLUX.2's double stream has one each
SCALE_ATTR = "para_attn_int8_scale"


def modulation_layers(root: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of every modulation layer under `root`, the final layer's included."""
    return [(name, module) for name, module in root.named_modules()
            if isinstance(module, torch.nn.Linear) and is_excluded(name, MODULATION_PATTERNS)]


def modulation_linears(root: torch.nn.Module, fp8_patterns: Iterable[str]) -> list[tuple[str, torch.nn.Linear]]:
    """(name, module) of the modulation layers under `root` that stay out of fp8 and hold a
    floating-point matrix (or the int8 one `to_int8` left)."""
    fp8_patterns = tuple(fp8_patterns)
    return [(name, module) for name, module in modulation_layers(root)
            if is_excluded(name, fp8_patterns) and module.weight is not None and module.weight.ndim == 2
            and (module.weight.dtype == torch.int8 or module.weight.element_size() >= 2)]


def is_int8(module: torch.nn.Module) -> bool:
    return module.weight.dtype == torch.int8 and getattr(module, SCALE_ATTR, None) is not None


class Int8Forward:
    """Mixed into a linear layer's class (`int8_class`). A class, not a per-layer callable,
    so that compiled blocks, which guard on the type of what they call, share one graph."""

    _para_attn_base: type  # the layer's own class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.int8:
            return int8_linear(x, self.weight, getattr(self, SCALE_ATTR), self.bias)
        return self._para_attn_base.forward(self, x)


def int8_class(cls: type) -> type:
    return mixed_class(Int8Forward, cls, "Int8Weight")


def patches(layers: list[tuple[str, torch.nn.Linear]]) -> dict:
    """{attribute path: new class} that gives each of `layers` the int8 forward."""
    return {f"{name}.__class__": int8_class(type(module)) for name, module in layers}


def to_int8(module: torch.nn.Linear) -> None:
    """Replace the module's weight by its int8 matrix; the row scales go beside it in a
    buffer (not saved in state dicts). The caller keeps the original to restore it."""
    w8, scale = quantize_weight_int8(module.weight)
    module.weight = torch.nn.Parameter(w8, requires_grad=False)
    module.register_buffer(SCALE_ATTR, scale, persistent=False)
