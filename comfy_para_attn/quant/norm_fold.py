"""A graph pass for inductor: the modulated LayerNorm in front of an fp8 linear layer folds
into that layer's activation quantization.

FLUX's and HunyuanVideo's blocks feed their qkv, first MLP and `linear1` layers with
`torch.addcmul(shift, layer_norm(x), 1 + scale)`. With FP8 Quantize those layers quantize
their input with `para_attn::gelu_tail_rowwise_fp8(rows, K)` (no GELU column,
`gelu_fusion.norm_fed_sites`). Inductor made the LayerNorm, the modulation and the
quantization two or three passes over each row; this pass, on dynamo's graph before inductor
lowers it (`pre_grad_custom_pass`), rewrites

    rows = addcmul(shift, layer_norm(x, (K,), None, None, eps), mul).reshape(-1, K)
    gelu_tail_rowwise_fp8(rows, K)
into
    layer_norm_modulate_rowwise_fp8(x, mul, shift, eps)

(one pass: `kernels.fp8_rowwise`). The pieces are checked on the graph's example values
(x [B, S, K] on a device where the kernel runs, mul and shift one vector per batch; inputs
with strided features are copied by the op); anything else is left alone.
"""
from __future__ import annotations

import torch

from comfy_para_attn.kernels.fp8_rowwise import why_not_norm_kernel

from .cat_fold import VIEWS, is_our_op, replace_with_call, shape_of

_LAYER_NORMS = (torch.nn.functional.layer_norm, torch.layer_norm)


def _arg(node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _plain_layer_norm(node, features: int):
    """(x, eps) when `node` is a LayerNorm over the last `features` values without affine
    parameters, else None."""
    if node.op != "call_function" or node.target not in _LAYER_NORMS:
        return None
    shape = _arg(node, 1, "normalized_shape")
    if (tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)) != (features,):
        return None
    if _arg(node, 2, "weight") is not None or _arg(node, 3, "bias") is not None:
        return None
    eps = _arg(node, 4, "eps", 1e-5)
    return (node.args[0], eps) if isinstance(eps, float) else None


def _one_vector_per_batch(node, x_shape) -> bool:
    shape = shape_of(node)
    return (shape is not None and len(shape) == 3 and shape[1] == 1 and shape[2] == x_shape[2]
            and shape[0] in (1, x_shape[0]))


def _modulated_norm(rows, features: int):
    """(x, mul, shift, eps, dead nodes) when `rows` is a view of
    `addcmul(shift, layer_norm(x), mul)` fit for the kernel, else None."""
    modulated = rows.args[0] if rows.op == "call_method" and rows.target in VIEWS else rows
    if modulated.op != "call_function" or modulated.target is not torch.addcmul:
        return None
    if len(modulated.args) != 3 or modulated.kwargs.get("value", 1) != 1:
        return None
    shift, normed, mul = modulated.args
    found = _plain_layer_norm(normed, features) if isinstance(normed, torch.fx.Node) else None
    if found is None or not all(isinstance(n, torch.fx.Node) for n in (shift, mul)):
        return None
    x, eps = found
    x_shape = shape_of(x)
    if x_shape is None or len(x_shape) != 3 or x_shape[2] != features:
        return None
    if not (_one_vector_per_batch(mul, x_shape) and _one_vector_per_batch(shift, x_shape)):
        return None
    values = [n.meta.get("example_value", n.meta.get("val")) for n in (x, mul, shift)]
    if any(not isinstance(v, torch.Tensor) for v in values) or why_not_norm_kernel(*values, any_strides=True):
        return None  # a device, dtype or broadcast the kernel does not take: inductor's code stays
    return x, mul, shift, eps, (rows, modulated, normed)


def fold_norms(graph: torch.fx.Graph) -> int:
    """Rewrite every match in `graph` (see the module docstring); returns how many."""
    folded = 0
    for node in list(graph.nodes):
        if not is_our_op(node, "gelu_tail_rowwise_fp8") or len(node.args) != 2:
            continue
        rows, gelu_from = node.args
        features = shape_of(rows)[-1] if shape_of(rows) else None
        if not isinstance(gelu_from, int) or gelu_from != features:
            continue  # a GELU on some columns: not this fold
        found = _modulated_norm(rows, features)
        if found is None:
            continue
        x, mul, shift, eps, dead = found
        from comfy_para_attn.kernels import triton_fp8_rowwise  # noqa: F401  registers the op (only where one matched: triton is there)

        # then the view, the addcmul and the LayerNorm, if nothing else reads them
        replace_with_call(graph, node, torch.ops.para_attn.layer_norm_modulate_rowwise_fp8.default,
                          (x, mul, shift, eps), dead)
        folded += 1
    return folded
