"""The forward of linear layers that ComfyUI casts per call (its manual-cast and scaled fp8
ops, which fp8 checkpoints load into) once FP8 Quantize has quantized them.

Their own forward would cast the weight to the compute dtype and multiply it by
`scale_weight`: on torchao's fp8 tensor that dequantizes it and scales it a second time. So
FP8 Quantize gives each such layer a class (an object patch, like the fused GELU classes)
whose forward runs a quantized weight through the plain linear and anything else through the
layer's own forward. A class and not an instance flag: ComfyUI undoes object patches but keeps
the weights when it switches between clones that share them, and the class follows that.
"""
from __future__ import annotations

import torch

from .layer_classes import mixed_class


def _quantized(weight) -> bool:
    """torchao's tensor. `quant.is_quantized` without its isinstance against an imported
    torchao class: this runs inside compiled blocks, where an import would break the graph."""
    return type(weight).__module__.startswith("torchao.")


def class_casts_weights(cls: type) -> bool:
    """ComfyUI's layer class casts its weight at every call (manual cast, fp8 ops)."""
    return bool(getattr(getattr(cls, "_para_attn_base", cls), "comfy_cast_weights", False))


def linear_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer`'s own forward (`layer._para_attn_base`), or the plain linear for a quantized
    weight of a layer whose own forward would cast it."""
    if _quantized(layer.weight) and class_casts_weights(type(layer)):
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    return layer._para_attn_base.forward(layer, x)


class QuantizedCastForward:
    """Mixed into a per-call-casting linear layer's class (`quantized_cast_class`)."""

    _para_attn_base: type  # the layer's own class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(self, x)


def quantized_cast_class(cls: type) -> type:
    return mixed_class(QuantizedCastForward, cls, "QuantizedCast")
