"""Route a ComfyUI model's attention to our local kernels (SDPA, Triton, Triton fp8).

One `optimized_attention_override` (ComfyUI calls it for every attention of the model):
plain self/cross attention without an exotic mask goes to `local_attention` with the chosen
backend; anything else (causal, 3-D masks, another pack's override first) goes on unchanged.
Under Context Parallel the workers select the same backend for the sharded attention.
"""
from __future__ import annotations

from torch import Tensor

from ...attention.local import BACKEND_CHOICES, calibrate_auto, key_padding_bias, local_attention
from .device_conds import keep_conds_on_device

FEATURE = "attention_backend"


def _unwrap(t):
    return t if isinstance(t, Tensor) else t.take()


class BackendAttention:
    def __init__(self, backend: str, previous=None):
        self.backend = backend  # per model: two models in one graph may choose differently
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        q, k, v = _unwrap(q), _unwrap(k), _unwrap(v)
        mask = kwargs.get("mask")
        key_mask_only = mask is None or (mask.dim() == 3 and mask.shape[1] == 1)
        if not key_mask_only or args:
            return self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous else func(q, k, v, heads, *args, **kwargs)
        if kwargs.get("skip_reshape", False):
            qh, kh, vh = q, k, v
        else:
            b = q.shape[0]
            qh, kh, vh = (t.view(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        bias = key_padding_bias(None if mask is None else mask.reshape(mask.shape[0], -1), qh.dtype)
        out = local_attention(qh, kh, vh, bias, backend=self.backend)[0]
        if kwargs.get("skip_output_reshape", False):
            return out
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def apply_attention_backend(model_patcher, name: str):
    """A clone of `model_patcher` whose attention runs on backend `name` (BACKEND_CHOICES)."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend must be one of {BACKEND_CHOICES}, got {name!r}")
    if name == "auto":
        calibrate_auto()  # measures once per process on a GPU; nothing on CPU
    model = model_patcher.clone()
    keep_conds_on_device(model)
    to = model.model_options.setdefault("transformer_options", {})
    to["para_attn"] = {**to.get("para_attn", {}), FEATURE: name}
    previous = to.get("optimized_attention_override")
    if isinstance(previous, BackendAttention):
        previous = previous.previous
    to["optimized_attention_override"] = BackendAttention(name, previous)
    return model
