"""A graph pass for inductor: the FLUX / HunyuanVideo single block's
`linear2(cat((attention, gelu(mlp)), -1))` quantizes the two pieces where they are.

With the GELU fused (`gelu_fusion`), the single block's `linear2` quantizes
`cat((attn, mlp))` with `para_attn::gelu_tail_rowwise_fp8`. The cat is a copy of the MLP
activations (4608 x 12288 bf16 for FLUX.1-dev at 1024x1024: 3.4 ms of a 97 ms step over its
38 blocks) that exists only to be read once more. This pass, run on dynamo's graph before
inductor lowers it (`pre_grad_custom_pass`), rewrites

    rows = cat((a, b), dim=-1).reshape(-1, K);  gelu_tail_rowwise_fp8(rows, a.shape[-1])
into
    cat_gelu_rowwise_fp8(a.reshape(-1, a_cols), b.reshape(-1, b_cols))

which reads `b` in place (a strided slice of `linear1`'s output). The result is the same
to the bit (same kernel, same arithmetic). Anything else in the graph is left alone.
`graph_folds.GraphFolds` runs it with the other folds.
"""
from __future__ import annotations

import torch

VIEWS = {"reshape", "view"}


def is_our_op(node, name: str) -> bool:
    """`node` calls `torch.ops.para_attn.<name>` (any overload)."""
    target = getattr(node, "target", None)
    packet = getattr(target, "_overloadpacket", target)
    return (node.op == "call_function" and getattr(packet, "_qualified_op_name", None) == f"para_attn::{name}")


def shape_of(node):
    """The shape of `node`'s example value in dynamo's graph, None if it has none."""
    value = node.meta.get("example_value", node.meta.get("val")) if hasattr(node, "meta") else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def replace_with_call(graph: torch.fx.Graph, node, target, args: tuple, dead=()) -> None:
    """Put `target(*args)` in `node`'s place, erase `node`, then each of `dead` (users before
    what they read) that nothing else reads any more."""
    with graph.inserting_before(node):
        call = graph.call_function(target, args)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for unused in dict.fromkeys(dead):
        if not unused.users:
            graph.erase_node(unused)


def _cat_pieces(rows, gelu_from: int):
    """(the cat node, (a, b)) when `rows` is `cat((a, b), last dim)` (or a view of it) with
    a.shape[-1] == gelu_from."""
    cat = rows
    if cat.op == "call_method" and cat.target in VIEWS:
        cat = cat.args[0]
    if not (cat.op == "call_function" and cat.target is torch.cat):
        return None
    pieces = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(pieces, (list, tuple)) or len(pieces) != 2:
        return None
    shapes = [shape_of(p) for p in pieces]
    if None in shapes or len(shapes[0]) != len(shapes[1]) or dim not in (-1, len(shapes[0]) - 1):
        return None
    if shapes[0][-1] != gelu_from or shapes[0][:-1] != shapes[1][:-1]:
        return None
    return cat, pieces


def fold_cats(graph: torch.fx.Graph) -> int:
    """Rewrite every match in `graph` (see the module docstring); returns how many."""
    folded = 0
    for node in list(graph.nodes):
        if not is_our_op(node, "gelu_tail_rowwise_fp8") or len(node.args) != 2:
            continue
        rows, gelu_from = node.args
        found = _cat_pieces(rows, gelu_from) if isinstance(gelu_from, int) else None
        if found is None:
            continue
        cat, pieces = found
        from comfy_para_attn.kernels import triton_fp8_rowwise  # noqa: F401  registers the op (only where one matched: triton is there)

        with graph.inserting_before(node):
            flat = tuple(graph.call_method("reshape", (p, -1, shape_of(p)[-1])) for p in pieces)
        # then the view and the cat (or the cat once), if nothing else reads them
        replace_with_call(graph, node, torch.ops.para_attn.cat_gelu_rowwise_fp8.default, flat, (rows, cat))
        folded += 1
    return folded
