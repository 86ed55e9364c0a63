"""A graph pass for inductor: the q/k RMSNorm and the rotary embedding in front of FLUX-style
attention become one kernel (`kernels.qk_norm_rope`).

ComfyUI's FLUX and HunyuanVideo blocks normalize q and k (`QKNorm`: `rms_norm`, then
`.to(v)`), FLUX's double blocks concatenate the text and image pieces along the sequence,
and `flux.math.attention` rotates them in fp32:

    pairs = x.to(float32).reshape(..., -1, 1, 2)
    out = (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(shape).type_as(v)

Newer ComfyUI rotates both with one op, `comfy_kitchen.apply_rope(q, k, pe)` (the same
arithmetic), and its RMSNorm passes `eps=None` (rms_norm's fp32 epsilon).

This pass, on dynamo's graph before inductor lowers it (`pre_grad_custom_pass`), finds that
chain back from each `type_as` (or each output of that op) and puts `para_attn::rms_norm_rope(head, tail, ...)` in its
place when the example values fit the kernel (`why_not_triton`: bf16 pieces on a device where
it runs, fp32 `pe` of the right shape). Anything else is left alone. Then `pair_rotations`
makes each q and k call that share a table one `rms_norm_rope_pair` call (the table read once
for both). Where only PyTorch's attention reads q and k, they are written sequence-major
(`feeds_attention_only`). PARA_ATTN_FUSED_ROPE=0 turns all of it off, PARA_ATTN_ROPE_PAIRS=0
the pairing, PARA_ATTN_ROPE_SEQ_MAJOR=0 the layout (for comparisons; inductor's cache keys on
them through the pass's uuid).
"""
from __future__ import annotations

import operator
import os
from collections import defaultdict

import torch

from .quant.cat_fold import VIEWS, replace_with_call

_RMS_NORMS = (torch.nn.functional.rms_norm, getattr(torch, "rms_norm", None))


def _value(node):
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_method(node, *names) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target in names


def _is_function(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _to_float32(node) -> bool:
    dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
    return _is_method(node, "to") and dtype is torch.float32


def _widened_pairs(node) -> bool:
    """`node` is `x.to(float32).reshape(...)` (the rotation's pairs)."""
    return _is_method(node, *VIEWS) and _is_method(node.args[0], "to") and _to_float32(node.args[0])


def _half_of(product):
    """(table, pairs, c, nodes) when `product` is `table[..., c] * pairs[..., c]` (either order)."""
    if not _is_function(product, operator.mul) or len(product.args) != 2:
        return None
    picked = []
    for factor in product.args:
        if not (_is_function(factor, operator.getitem) and isinstance(factor.args[1], tuple)
                and len(factor.args[1]) == 2 and factor.args[1][0] is Ellipsis and factor.args[1][1] in (0, 1)):
            return None
        picked.append((factor.args[0], factor.args[1][1]))
    (a, ca), (b, cb) = picked
    if ca != cb or _widened_pairs(a) == _widened_pairs(b):
        return None
    table, pairs = (b, a) if _widened_pairs(a) else (a, b)
    return table, pairs, ca, [product, *product.args]


def _rotation(out):
    """(pe, source, nodes) when `out` is the rotation's `type_as` (see the module docstring)."""
    if not _is_method(out, "type_as"):
        return None
    shaped = out.args[0]
    if not _is_method(shaped, *VIEWS) or not _is_function(shaped.args[0], operator.add, torch.add):
        return None
    added = shaped.args[0]
    if added.kwargs.get("alpha", 1) != 1 or len(added.args) > 2:
        return None
    halves = [_half_of(p) for p in added.args[:2]]
    if len(added.args) != 2 or None in halves or {c for _, _, c, _ in halves} != {0, 1}:
        return None
    (pe, pairs, _, first), (pe_again, pairs_again, _, second) = halves
    if pe is not pe_again or pairs is not pairs_again:
        return None
    widened = pairs.args[0]
    source = widened.args[0]
    out_value, source_value, pairs_value = _value(out), _value(source), _value(pairs)
    if out_value is None or source_value is None or pairs_value is None:
        return None
    shape = tuple(source_value.shape)
    if tuple(out_value.shape) != shape or tuple(pairs_value.shape) != (*shape[:-1], shape[-1] // 2, 1, 2):
        return None  # another reshape than the rotation's: not this computation
    return pe, source, [out, shaped, added, *first, *second, pairs, widened]


def _normed_piece(node):
    """(piece, weight, eps, nodes) when `node` is `rms_norm(piece, (D,), weight, eps)`,
    possibly followed by `.to(v)`."""
    nodes = []
    if _is_method(node, "to") and len(node.args) == 2 and isinstance(node.args[1], torch.fx.Node):
        nodes.append(node)
        node = node.args[0]
    if not _is_function(node, *_RMS_NORMS) or len(node.args) < 3:
        return None
    piece, shape, weight = node.args[:3]
    eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
    value = _value(piece)
    if eps is None and value is not None and value.dtype in (torch.bfloat16, torch.float16, torch.float32):
        eps = torch.finfo(torch.float32).eps  # rms_norm's default there (newer ComfyUI's RMSNorm passes None)
    if value is None or not isinstance(eps, float) or tuple(shape) != (value.shape[-1],):
        return None
    return piece, weight, eps, nodes + [node]


def _pieces(source):
    """([(piece, weight, eps, nodes)], extra nodes) for one normed tensor or a cat of two on dim 2."""
    if _is_function(source, torch.cat):
        tensors = source.args[0] if source.args else source.kwargs.get("tensors")
        dim = source.args[1] if len(source.args) > 1 else source.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (2, -2):
            return None
        found = [_normed_piece(t) for t in tensors]
        return (found, [source]) if None not in found else None
    found = _normed_piece(source)
    return ([found], []) if found is not None else None


def _attention_ops() -> set:
    ops = {torch.nn.functional.scaled_dot_product_attention}
    for name in ("scaled_dot_product_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention"):
        op = getattr(torch.ops.aten, name, None)
        ops |= {op, op.default} if op is not None else set()
    return ops


def feeds_attention_only(node: torch.fx.Node) -> bool:
    """Every user of `node` (reads of its size aside) takes it as the query or key of a
    PyTorch attention call, which reads any layout with a dense last dim; cuDNN and flash
    write their output in the query's layout (the efficient kernel always [B, S, H, D]). Our
    kernel can then write [B, S, H, D] (`seq_major`), so that ComfyUI's `transpose(1, 2)
    .reshape(B, S, H * D)` of the output is a view, not a copy. Anything else (context
    parallelism's all-to-all, another attention) gets the contiguous layout it had."""
    ops = _attention_ops()
    readers = [user for user in node.users if not _reads_shape_only(user)]
    return seq_major_enabled() and bool(readers) and all(
        user.op == "call_function" and user.target in ops and node in user.args[:2]
        and node not in user.args[2:] and node not in user.kwargs.values() for user in readers)


def _reads_shape_only(node: torch.fx.Node) -> bool:
    """`x.size(...)` / `x.dim()` (dynamic shapes put these in the graph): the layout does not matter."""
    sym_size = getattr(torch.ops.aten, "sym_size", None)
    return _is_method(node, "size", "dim") or (sym_size is not None and _is_function(node, sym_size, sym_size.int))


SWITCH = "PARA_ATTN_FUSED_ROPE"
PAIRS_SWITCH = "PARA_ATTN_ROPE_PAIRS"
SEQ_MAJOR_SWITCH = "PARA_ATTN_ROPE_SEQ_MAJOR"


def seq_major_enabled() -> bool:
    """False when PARA_ATTN_ROPE_SEQ_MAJOR=0 (for comparisons; `GraphFolds.uuid` includes it)."""
    return os.environ.get(SEQ_MAJOR_SWITCH, "1") != "0"


def enabled() -> bool:
    """False when PARA_ATTN_FUSED_ROPE=0 (for comparisons; `GraphFolds.uuid` includes it)."""
    return os.environ.get(SWITCH, "1") != "0"


def pairs_enabled() -> bool:
    """False when PARA_ATTN_ROPE_PAIRS=0 or the fold is off (`GraphFolds.uuid` includes it)."""
    return enabled() and os.environ.get(PAIRS_SWITCH, "1") != "0"


def _kitchen_rope_ops() -> tuple:
    packet = getattr(getattr(torch.ops, "comfy_kitchen", None), "apply_rope", None)
    return (packet, packet.default) if packet is not None else ()


def _kitchen_rotations(node):
    """[(out, pe, source, chain)] for q and k when `node` is newer ComfyUI's rotation of both,
    `comfy_kitchen.apply_rope(q, k, pe)` (the same arithmetic as the plain rotation above),
    read through `[0]` and `[1]` only."""
    ops = _kitchen_rope_ops()
    if not ops or not _is_function(node, *ops) or len(node.args) != 3 or node.kwargs:
        return []
    outs = {user.args[1]: user for user in node.users
            if _is_function(user, operator.getitem) and user.args[0] is node}
    if len(node.users) != 2 or set(outs) != {0, 1}:
        return []
    q, k, pe = node.args
    return [(outs[0], pe, q, [outs[0], node]), (outs[1], pe, k, [outs[1], node])]


def _matches(graph: torch.fx.Graph) -> list:
    """(out, pe, source, chain) for every rotation in `graph`, either form; `chain` holds the
    nodes it replaces, `out` first."""
    found = []
    for node in graph.nodes:
        rotation = _rotation(node)
        if rotation is not None:
            pe, source, chain = rotation
            found.append((node, pe, source, chain))
        kitchen = _kitchen_rotations(node)
        if kitchen and all(_pieces(source) is not None for _, _, source, _ in kitchen):
            found += kitchen  # both or neither: the op computes q and k together
    return found


def fold_rotations(graph: torch.fx.Graph) -> int:
    """Rewrite every match in `graph` (see the module docstring); returns how many."""
    from comfy_para_attn.kernels.qk_norm_rope import why_not_triton

    if not enabled():
        return 0
    folded = 0
    for node, pe, source, chain in _matches(graph):
        found = _pieces(source)
        if found is None:
            continue
        pieces, extra = found
        values = [_value(p) for p, _, _, _ in pieces]
        weights = [_value(w) for _, w, _, _ in pieces]
        if (None in values or None in weights or _value(pe) is None or len({e for _, _, e, _ in pieces}) != 1
                or _value(node) is None or _value(node).dtype != torch.bfloat16
                or why_not_triton(values, weights, _value(pe)) is not None):
            continue
        from comfy_para_attn.kernels import triton_qk_norm_rope  # noqa: F401  registers the op

        (head, w_head, eps, _), (tail, w_tail, _, _) = pieces[0], pieces[-1]
        replace_with_call(graph, node, torch.ops.para_attn.rms_norm_rope.default,
                          (head, tail, w_head, w_tail, pe, eps, len(pieces) == 2, feeds_attention_only(node)),
                          chain[1:] + extra + [n for _, _, _, nodes in pieces for n in nodes])
        folded += 1
    return folded


def pair_rotations(graph: torch.fx.Graph) -> int:
    """Our `rms_norm_rope` calls on one table (same `pe` node, eps and piece count), taken two
    at a time in graph order (a block's q, then its k), become one `rms_norm_rope_pair` call
    placed at the second, where the pair kernel takes them and nothing reads the first before
    that point. Returns how many pairs."""
    from comfy_para_attn.kernels.qk_norm_rope import why_not_triton_pair

    if not pairs_enabled():
        return 0
    single = getattr(getattr(torch.ops, "para_attn", None), "rms_norm_rope", None)
    if single is None:
        return 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    groups = defaultdict(list)
    for node in graph.nodes:
        if _is_function(node, single.default):
            head, tail, _, _, pe, eps, two_pieces, _ = node.args
            groups[(pe, eps, two_pieces)].append(node)
    paired = 0
    for (pe, eps, two_pieces), calls in groups.items():
        for first, second in zip(calls[0::2], calls[1::2]):
            q, k = first.args, second.args
            # Sequence-major only if both may be (ring attention sends k around: it keeps its layout).
            seq_major = q[7] and k[7]
            q_pieces = [_value(q[0])] + ([_value(q[1])] if two_pieces else [])
            k_pieces = [_value(k[0])] + ([_value(k[1])] if two_pieces else [])
            weights = [_value(w) for w in (q[2], q[3], k[2], k[3])]
            if (None in q_pieces + k_pieces + weights or _value(pe) is None
                    or any(order[user] < order[second] for user in first.users)
                    or why_not_triton_pair(q_pieces, k_pieces, weights[:len(q_pieces)], weights[2:2 + len(k_pieces)],
                                           _value(pe)) is not None):
                continue
            from comfy_para_attn.kernels import triton_qk_norm_rope  # noqa: F401  registers the op

            with graph.inserting_after(second):
                pair = graph.call_function(torch.ops.para_attn.rms_norm_rope_pair.default,
                                           (q[0], q[1], k[0], k[1], q[2], q[3], k[2], k[3], pe, eps, two_pieces,
                                            seq_major))
            with graph.inserting_after(pair):
                k_out = graph.call_function(operator.getitem, (pair, 1))
                q_out = graph.call_function(operator.getitem, (pair, 0))
            first.replace_all_uses_with(q_out)
            second.replace_all_uses_with(k_out)
            graph.erase_node(first)
            graph.erase_node(second)
            paired += 1
    return paired
