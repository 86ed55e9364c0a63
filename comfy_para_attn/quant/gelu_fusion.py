"""The tanh GELU in front of an fp8 linear layer, moved into that layer's activation
quantization (`kernels.fp8_rowwise`: one pass over each row instead of inductor's two, each
recomputing the GELU).

Where: `nn.Sequential(Linear, GELU(tanh), Linear)` MLPs (FLUX / HunyuanVideo double blocks,
Wan's feed-forward) and FLUX-style single-stream blocks, whose `linear2` gets
`cat(attention, mlp_act(mlp))`. At such a site the GELU module becomes an identity
(`GeluMovedOn`) and the second linear layer's class becomes a subclass of its own that
applies the GELU to its input's tail (columns >= `gelu_from`) first: on the fused path when
its weight is torchao's dynamic row-wise fp8 and the input CUDA bf16, as a plain GELU then
the layer's own forward otherwise (under torch.compile that is one fused elementwise
kernel). So the pair stays correct whatever the weight becomes (restored bf16, weight-only
fp8, offloaded). `patches` gives the changes as {attribute path: new value}; the ComfyUI
adapter makes them object patches, which ComfyUI applies at every load and undoes.

The layers FLUX-style blocks feed with a modulated LayerNorm (`norm_fed_sites`: the double
blocks' qkv and first MLP layers, the single blocks' `linear1`) get the same class with the
GELU on no column (`gelu_from` = their input width): they quantize their input with the
kernel's op, where `quant.norm_fold` folds the LayerNorm and modulation in under
torch.compile; so do the double blocks' attention output projections
(`attention_output_sites`), where nothing folds.
"""
from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F

from comfy_para_attn.kernels.fp8_rowwise import gelu_tail_rowwise_fp8, quantizes_here
from .layer_classes import mixed_class
from .stored_fp8 import linear_forward

# The single-stream block forward whose `mlp_act` output goes only into `linear2`'s input tail
# (ComfyUI's FLUX / HunyuanVideo SingleStreamBlock); any other forward is left alone. Newer
# ComfyUI names the activation's output first and, for blocks with `yak_mlp` set, gates half
# of the MLP with it instead: those blocks are left alone too.
_SINGLE_BLOCK_CALL = "self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))"
_SINGLE_BLOCK_NAMED = ("mlp = self.mlp_act(mlp)\n", "self.linear2(torch.cat((attn, mlp), 2))")


def _single_block_site(module) -> bool:
    source = _forward_source(type(module))
    if _SINGLE_BLOCK_CALL in source:
        return True
    return all(line in source for line in _SINGLE_BLOCK_NAMED) and getattr(module, "yak_mlp", False) is False


class FusionSite(NamedTuple):
    gelu: str  # dotted path of the GELU module ("" for a norm-fed site: no GELU)
    linear: str  # dotted path of the linear layer that consumes its output
    gelu_from: int  # first input column of that layer that went through the GELU


def _gelu_slot(module) -> bool:
    """A tanh GELU, or the stand-in a fusion left there (sites are found on a model whose
    fusion ComfyUI has applied, too)."""
    return isinstance(module, GeluMovedOn) or (isinstance(module, torch.nn.GELU) and module.approximate == "tanh")


@functools.lru_cache(maxsize=None)
def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def fusion_sites(root: torch.nn.Module) -> list[FusionSite]:
    """Every tanh GELU -> linear pair under `root` that can be fused."""
    sites = []
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        if (isinstance(module, torch.nn.Sequential) and len(module) == 3 and isinstance(module[0], torch.nn.Linear)
                and _gelu_slot(module[1]) and isinstance(module[2], torch.nn.Linear)):
            sites.append(FusionSite(f"{prefix}1", f"{prefix}2", 0))
        elif (_gelu_slot(getattr(module, "mlp_act", None))
              and isinstance(getattr(module, "linear2", None), torch.nn.Linear)
              and isinstance(getattr(module, "hidden_size", None), int)
              and _single_block_site(module)):
            sites.append(FusionSite(f"{prefix}mlp_act", f"{prefix}linear2", module.hidden_size))
    return sites


# FLUX-style blocks (ComfyUI's flux.layers, which HunyuanVideo uses too): LayerNorm without
# affine parameters -> the linear layer its modulated output feeds.
_NORM_FED = {"img_norm1": "img_attn.qkv", "txt_norm1": "txt_attn.qkv", "img_norm2": "img_mlp.0",
             "txt_norm2": "txt_mlp.0", "pre_norm": "linear1"}


def _plain_layer_norm(module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) and not module.elementwise_affine


def _linears_at(root: torch.nn.Module, paths):
    """(prefix, module, path, layer) for every module under `root` that has a linear layer
    at the dotted `path` (each of `paths`)."""
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        for path in paths:
            try:
                layer = module_at(module, path)
            except (AttributeError, IndexError, TypeError):
                continue
            if isinstance(layer, torch.nn.Linear):
                yield prefix, module, path, layer


def norm_fed_sites(root: torch.nn.Module) -> list[FusionSite]:
    """The linear layers under `root` that FLUX-style blocks feed with a modulated LayerNorm."""
    norm_of = {linear: norm for norm, linear in _NORM_FED.items()}
    return [FusionSite("", f"{prefix}{path}", layer.in_features)
            for prefix, module, path, layer in _linears_at(root, norm_of)
            if _plain_layer_norm(getattr(module, norm_of[path], None))]


# FLUX-style double blocks' attention output projections: nothing folds into them, but our
# kernel quantizes a row in one pass where inductor's code for torchao's quantization made
# two (H100, FLUX.1-dev image tokens: 28 us a call).
_ATTENTION_OUTPUT = ("img_attn.proj", "txt_attn.proj")


def attention_output_sites(root: torch.nn.Module) -> list[FusionSite]:
    """The attention output projections of FLUX-style double blocks under `root` (no GELU,
    no fold: the class quantizes the input with the kernel's op)."""
    return [FusionSite("", f"{prefix}{path}", layer.in_features)
            for prefix, module, path, layer in _linears_at(root, _ATTENTION_OUTPUT)
            if isinstance(getattr(module, "img_mod", None), torch.nn.Module)]


def all_sites(root: torch.nn.Module, norm_fed: bool = True, attention_outputs: bool = True) -> list[FusionSite]:
    """The GELU sites under `root`, then (unless turned off) the norm-fed layers and the
    attention output projections: every layer FP8 Quantize gives the fused class."""
    sites = fusion_sites(root)
    if norm_fed:
        sites += norm_fed_sites(root)
    if attention_outputs:
        sites += attention_output_sites(root)
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


class GeluMovedOn(torch.nn.Identity):
    """Stands where a tanh GELU was: the next linear layer applies it (see `GeluThenLinear`)."""


# cuBLASLt has no row-wise scaled fp8 GEMM with a bias for a small output over long rows (H100,
# torch 2.11 + CUDA 13: K >= 6144 and M x N up to ~100k values fail with
# CUBLAS_STATUS_NOT_SUPPORTED, e.g. a short HunyuanVideo prompt's text tokens, which ComfyUI
# does not pad, through an MLP output layer): outputs under this many values get their bias
# added after the GEMM. torchao's own path (layers without this class) passes the bias as it is.
SMALL_OUTPUT = 1 << 18


class GeluThenLinear:
    """Mixed into a linear layer's class (`fused_class`): GELU on the input's tail (columns
    >= the class's `_para_attn_gelu_from`), then the layer. A class, not a per-layer callable:
    compiled blocks guard on the type of what they call, so every block shares one graph (a
    callable object per layer recompiled every block, then ran them eager)."""

    _para_attn_base: type  # the layer's own class
    _para_attn_gelu_from: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, start = self.weight, self._para_attn_gelu_from
        if x.dtype == torch.bfloat16 and quantizes_here(x) and rowwise_dynamic_fp8(weight):
            rows = x.reshape(-1, x.shape[-1])
            q, scale = gelu_tail_rowwise_fp8(rows, start)
            bias_after = self.bias is not None and rows.shape[0] * weight.shape[0] < SMALL_OUTPUT
            out = torch._scaled_mm(q, weight.qdata.t(), scale_a=scale, scale_b=weight.scale.t(),
                                   bias=None if bias_after else self.bias, out_dtype=x.dtype,
                                   use_fast_accum=weight.mm_config.use_fast_accum)
            if bias_after:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], out.shape[-1])
        if start >= x.shape[-1]:  # a norm-fed site: no GELU
            return linear_forward(self, x)
        tail = F.gelu(x[..., start:], approximate="tanh")
        return linear_forward(self, torch.cat((x[..., :start], tail), dim=-1) if start else tail)


def fused_class(cls: type, gelu_from: int) -> type:
    """`cls` with `GeluThenLinear`'s forward for `gelu_from` (one subclass per pair)."""
    return mixed_class(GeluThenLinear, cls, "GeluThen", _para_attn_gelu_from=gelu_from)


def module_at(root, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def patches(root: torch.nn.Module, sites: list[FusionSite]) -> dict:
    """{attribute path under `root`: new value} that fuses `sites`: the GELU's slot gets a
    `GeluMovedOn`, the linear layer's `__class__` its fused subclass."""
    out = {}
    for site in sites:
        linear = module_at(root, site.linear)
        if site.gelu:
            out[site.gelu] = GeluMovedOn()
        out[f"{site.linear}.__class__"] = fused_class(type(linear), site.gelu_from)
    return out


def apply_patches(root: torch.nn.Module, changes: dict) -> dict:
    """Set `changes` (from `patches`) on `root`; returns the previous values (for the same)."""
    previous = {}
    for path, value in changes.items():
        parent_path, _, attr = path.rpartition(".")
        parent = module_at(root, parent_path) if parent_path else root
        previous[path] = getattr(parent, attr)
        setattr(parent, attr, value)  # nn.Sequential keeps its children under "0", "1", ...
    return previous
