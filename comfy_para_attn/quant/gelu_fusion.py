"""The tanh GELU in front of an fp8 linear layer, moved into that layer's activation
quantization (`kernels.fp8_rowwise`: one pass over each row instead of inductor's two, each
recomputing the GELU).

Where: `nn.Sequential(Linear, GELU(tanh), Linear)` MLPs (FLUX / HunyuanVideo double blocks,
Wan's feed-forward) and FLUX-style single-stream blocks, whose `linear2` gets
`cat(attention, mlp_act(mlp))`. At such a site the GELU module becomes an identity and the
second linear layer (its class swapped for a subclass) applies the GELU to its input's tail
(columns >= `gelu_from`) first: on the fused path when its weight is torchao's dynamic row-wise fp8 on a CUDA bf16
input, as a plain GELU then the layer's own forward otherwise. So the pair stays correct
whatever the weight becomes (restored bf16, weight-only fp8, offloaded). Nothing here knows
about ComfyUI; the adapter installs the sites and restores them.
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The single-stream block forward whose `mlp_act` output goes only into `linear2`'s input tail
# (ComfyUI's FLUX / HunyuanVideo SingleStreamBlock); any other forward is left alone.
_SINGLE_BLOCK_CALL = "self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))"


class FusionSite(NamedTuple):
    gelu: str  # dotted path of the GELU module
    linear: str  # dotted path of the linear layer that consumes its output
    gelu_from: int  # first input column of that layer that went through the GELU


def _is_tanh_gelu(module) -> bool:
    return isinstance(module, torch.nn.GELU) and module.approximate == "tanh"


def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def fusion_sites(root: torch.nn.Module) -> list[FusionSite]:
    """Every GELU -> linear pair under `root` that `install` can fuse."""
    sites = []
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        if (isinstance(module, torch.nn.Sequential) and len(module) == 3 and isinstance(module[0], torch.nn.Linear)
                and _is_tanh_gelu(module[1]) and isinstance(module[2], torch.nn.Linear)):
            sites.append(FusionSite(f"{prefix}1", f"{prefix}2", 0))
        elif (_is_tanh_gelu(getattr(module, "mlp_act", None)) and isinstance(getattr(module, "linear2", None),
                                                                            torch.nn.Linear)
              and isinstance(getattr(module, "hidden_size", None), int)
              and _SINGLE_BLOCK_CALL in _forward_source(type(module))):
            sites.append(FusionSite(f"{prefix}mlp_act", f"{prefix}linear2", module.hidden_size))
    return sites


def rowwise_dynamic_fp8(weight) -> bool:
    """torchao's fp8 weight with row-wise scales whose activations are quantized per row
    at each call (Float8DynamicActivationFloat8WeightConfig(PerRow()))."""
    kwargs = getattr(weight, "act_quant_kwargs", None)
    qdata, scale = getattr(weight, "qdata", None), getattr(weight, "scale", None)
    return (kwargs is not None and qdata is not None and qdata.dtype == torch.float8_e4m3fn
            and scale is not None and tuple(scale.shape) == (qdata.shape[0], 1)
            and type(kwargs.granularity).__name__ == "PerRow" and kwargs.float8_dtype == torch.float8_e4m3fn
            and kwargs.hp_value_lb is None and kwargs.hp_value_ub is None)


def _fusable(x: torch.Tensor) -> bool:
    """A bf16 input where the fused kernel runs: CUDA, or CPU under Triton's interpreter
    (the CPU tests)."""
    import kernels.fp8_rowwise  # noqa: F401  registers torch.ops.para_attn.gelu_tail_rowwise_fp8
    from kernels._runtime import interpreting

    return x.dtype == torch.bfloat16 and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


class GeluThenLinear:
    """Mixed into a linear layer's class by `install` (the layer's class becomes a subclass of
    its own): GELU on the input's tail (columns >= `_para_attn_gelu_from`), then the layer.
    A class, not a per-layer callable: compiled blocks guard on the type of what they call,
    so every block shares one graph (a callable object per layer recompiled every block)."""

    _para_attn_base: type  # the layer's own class

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, start = self.weight, self._para_attn_gelu_from
        if _fusable(x) and rowwise_dynamic_fp8(weight):
            rows = x.reshape(-1, x.shape[-1])
            q, scale = torch.ops.para_attn.gelu_tail_rowwise_fp8(rows, start)
            out = torch._scaled_mm(q, weight.qdata.t(), scale_a=scale, scale_b=weight.scale.t(), bias=self.bias,
                                   out_dtype=x.dtype, use_fast_accum=weight.mm_config.use_fast_accum)
            return out.reshape(*x.shape[:-1], out.shape[-1])
        tail = F.gelu(x[..., start:], approximate="tanh")
        return self._para_attn_base.forward(self, torch.cat((x[..., :start], tail), dim=-1) if start else tail)


_fused_classes: dict = {}


def fused_class(cls: type) -> type:
    """`cls` with `GeluThenLinear`'s forward (one subclass per linear class)."""
    if issubclass(cls, GeluThenLinear):
        return cls
    if cls not in _fused_classes:
        _fused_classes[cls] = type(f"GeluThen{cls.__name__}", (GeluThenLinear, cls),
                                   {"_para_attn_base": cls, "__module__": __name__})
    return _fused_classes[cls]


def fuse_linear(linear: torch.nn.Linear, gelu_from: int) -> torch.nn.Linear:
    """Make `linear` apply the tanh GELU to its input's columns >= gelu_from (in place)."""
    linear._para_attn_gelu_from = gelu_from
    linear.__class__ = fused_class(type(linear))
    return linear


def module_at(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


# One identity per replaced GELU, kept on that GELU and reused by every install: re-installing
# after ComfyUI restored the model (a LoRA change, an unload) hands compiled blocks the same
# objects again.
_CACHED = "_para_attn_identity"


def install(root: torch.nn.Module, sites: list[FusionSite]) -> dict:
    """Fuse `sites` in place; returns {attribute path: previous value} (paths relative to
    `root`; a linear layer's entry is its `__class__`), which setting back undoes it."""
    previous = {}
    for site in sites:
        parent_path, _, attr = site.gelu.rpartition(".")
        parent = module_at(root, parent_path) if parent_path else root
        linear = module_at(root, site.linear)
        if isinstance(linear, GeluThenLinear):
            continue  # already fused
        gelu = getattr(parent, attr)
        previous[site.gelu] = gelu
        previous[f"{site.linear}.__class__"] = type(linear)
        identity = gelu.__dict__.get(_CACHED)
        if identity is None:
            identity = torch.nn.Identity()
            object.__setattr__(gelu, _CACHED, identity)  # a plain attribute, not a submodule
        setattr(parent, attr, identity)  # nn.Sequential keeps its children under "0", "1", ...
        fuse_linear(linear, site.gelu_from)
    return previous


def restore(root: torch.nn.Module, previous: dict) -> None:
    """Undo `install` (the values it returned)."""
    for path, value in previous.items():
        parent_path, _, attr = path.rpartition(".")
        setattr(module_at(root, parent_path) if parent_path else root, attr, value)
