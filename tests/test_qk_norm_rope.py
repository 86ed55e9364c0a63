"""The q/k RMSNorm + rotary embedding kernel (`kernels.qk_norm_rope`) against the plain
computation (on CUDA, or on CPU through Triton's interpreter), and the graph pass that puts it
in place of FLUX's attention preparation (`comfy_para_attn.rope_fold`; ComfyUI's own blocks
are checked in tests/test_fp8_norm_fold.py, comfyui tier)."""
import importlib.util
import os
import sys

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if HAVE_TRITON and DEVICE == "cpu" and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported

from comfy_para_attn.testing.fp8_checks import compiled_with_folds, kernel_unavailable_reason  # noqa: E402
from comfy_para_attn.kernels.qk_norm_rope import (rms_norm_rope, rms_norm_rope_pair, rms_norm_rope_reference,  # noqa: E402
                                  why_not_triton, why_not_triton_pair)

needs_kernel = pytest.mark.skipif(kernel_unavailable_reason() is not None, reason=str(kernel_unavailable_reason()))
HEADS, DIM, EPS = 3, 16, 1e-6


def _qkv(tokens, seed):
    """(q, k, v) as FLUX splits a qkv projection: strided [1, H, S, D] views of one tensor."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(1, tokens, 3 * HEADS * DIM, generator=g) * 2 + 0.3).to(torch.bfloat16).to(DEVICE)
    return qkv.view(1, tokens, 3, HEADS, DIM).permute(2, 0, 3, 1, 4)


def _weight(seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(DIM, generator=g) + 0.5).to(torch.bfloat16).to(DEVICE)


def _pe(tokens, seed=9):
    """FLUX's rotation table: [1, 1, S, D/2, 2, 2] fp32 rotations by random angles."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(1, 1, tokens, DIM // 2, generator=g) * 6
    table = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=-1)
    return table.reshape(1, 1, tokens, DIM // 2, 2, 2).to(DEVICE)


def _assert_close(out, ref, seq_major=False):
    # seq_major: a [B, S, H, D] buffer seen as [B, H, S, D]
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.bfloat16
    assert (out.transpose(1, 2) if seq_major else out).is_contiguous()
    assert torch.isfinite(out).all() and ref.abs().mean() > 0.1
    # fp32 products summed in another order can move a bf16 rounding, rarely
    assert (out.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2 ** -7
    assert (out != ref).float().mean() < 1e-2


@needs_kernel
@pytest.mark.parametrize("seq_major", [False, True], ids=["heads major", "sequence major"])
@pytest.mark.parametrize("lengths", [(5, 70), (70,)])
def test_kernel_matches_the_plain_computation(lengths, seq_major):
    pieces = [_qkv(n, seed=i)[0] for i, n in enumerate(lengths)]
    weights = [_weight(10 + i) for i in range(len(lengths))]
    pe = _pe(sum(lengths))
    assert why_not_triton(pieces, weights, pe) is None and pieces[0].stride(2) == 3 * HEADS * DIM
    _assert_close(rms_norm_rope(pieces, weights, pe, EPS, seq_major=seq_major),
                  rms_norm_rope_reference(pieces, weights, pe, EPS), seq_major)


@needs_kernel
@pytest.mark.parametrize("seq_major", [False, True], ids=["heads major", "sequence major"])
@pytest.mark.parametrize("lengths", [(5, 70), (70,)])
def test_pair_kernel_matches_the_plain_computation_of_q_and_k(lengths, seq_major):
    """q and k in one kernel (the rotation table read once for both): each equals its own
    plain computation, with its own weights."""
    qkvs = [_qkv(n, seed=i) for i, n in enumerate(lengths)]
    q_pieces, k_pieces = [t[0] for t in qkvs], [t[1] for t in qkvs]
    q_weights = [_weight(10 + i) for i in range(len(lengths))]
    k_weights = [_weight(20 + i) for i in range(len(lengths))]
    pe = _pe(sum(lengths))
    assert why_not_triton_pair(q_pieces, k_pieces, q_weights, k_weights, pe) is None
    q, k = rms_norm_rope_pair(q_pieces, k_pieces, q_weights, k_weights, pe, EPS, seq_major=seq_major)
    _assert_close(q, rms_norm_rope_reference(q_pieces, q_weights, pe, EPS), seq_major)
    _assert_close(k, rms_norm_rope_reference(k_pieces, k_weights, pe, EPS), seq_major)
    assert "different shapes" in why_not_triton_pair(q_pieces, [p[:, :1] for p in k_pieces], q_weights,
                                                     k_weights, pe)


def test_inputs_the_kernel_cannot_take_fall_back_to_the_plain_computation():
    q = _qkv(8, seed=1)[0]
    w, pe = _weight(2), _pe(8)
    assert "pe" in why_not_triton([q], [w], pe[:, :, :4])
    assert "float16" in why_not_triton([q.half()], [w], pe)
    assert "pieces" in why_not_triton([q, q, q], [w, w, w], _pe(24))
    out = rms_norm_rope([q.half()], [w.half()], pe, EPS)
    assert torch.equal(out, rms_norm_rope_reference([q.half()], [w.half()], pe, EPS))
    out = rms_norm_rope([q.half()], [w.half()], pe, EPS, seq_major=True)  # the layout asked for, here too
    assert out.transpose(1, 2).is_contiguous() and torch.equal(out, rms_norm_rope_reference([q.half()], [w.half()], pe, EPS))


class _AttentionPrep(torch.nn.Module):
    """FLUX's double-block attention preparation written out: q of the text and image pieces
    normalized with their own weights, concatenated, rotated in fp32."""

    def __init__(self, variant="flux"):
        super().__init__()
        self.variant = variant
        self.txt_weight = torch.nn.Parameter(_weight(3), requires_grad=False)
        self.img_weight = torch.nn.Parameter(_weight(4), requires_grad=False)

    def forward(self, txt_qkv, img_qkv, pe):
        def split(t):
            return t.view(t.shape[0], t.shape[1], 3, HEADS, -1).permute(2, 0, 3, 1, 4)

        txt_q, _, txt_v = split(txt_qkv)
        img_q, _, img_v = split(img_qkv)
        txt_q = torch.nn.functional.rms_norm(txt_q, (DIM,), self.txt_weight, EPS).to(txt_v)
        img_q = torch.nn.functional.rms_norm(img_q, (DIM,), self.img_weight, EPS).to(img_v)
        if self.variant == "cat keywords":
            q = torch.cat(tensors=(txt_q, img_q), dim=2)
        else:
            q = torch.cat((txt_q, img_q), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        pairs = q.to(dtype=torch.float32).reshape(*q.shape[:-1], -1, 1, 2)
        first, second = pe[..., 0] * pairs[..., 0], pe[..., 1] * pairs[..., 1]
        rotated = torch.add(first, second, alpha=2) if self.variant == "alpha" else first + second
        shape = (*q.shape[:2], -1) if self.variant == "other reshape" else q.shape
        return rotated.reshape(*shape).type_as(v), v


@needs_kernel
def test_fold_rewrites_the_attention_preparation_and_keeps_the_output():
    prep = _AttentionPrep()
    inputs = (_qkv(5, seed=5).permute(1, 3, 0, 2, 4).reshape(1, 5, -1), _qkv(40, seed=6).permute(1, 3, 0, 2, 4).reshape(1, 40, -1),
              _pe(45))
    (expected_q, expected_v) = prep(*inputs)
    (q, v), counts, targets = compiled_with_folds(prep, *inputs)
    assert counts == {"rope": 1, "cat": 0, "layer norm": 0, "rope pairs": 0}
    assert "para_attn.rms_norm_rope.default" in targets and not any("rms_norm" in t and "para_attn" not in t for t in targets)
    assert torch.equal(v, expected_v)  # v's cat is left alone
    _assert_close(q, expected_q)


@needs_kernel
def test_fp16_attention_is_left_alone():
    prep = _AttentionPrep().half()
    inputs = (_qkv(5, seed=7).half().permute(1, 3, 0, 2, 4).reshape(1, 5, -1),
              _qkv(40, seed=8).half().permute(1, 3, 0, 2, 4).reshape(1, 40, -1), _pe(45))
    expected_q, _ = prep(*inputs)
    (q, _), counts, _ = compiled_with_folds(prep, *inputs)
    assert counts["rope"] == 0 and torch.equal(q, expected_q)


def test_the_switch_turns_the_fold_off_and_changes_the_cache_key(monkeypatch):
    """PARA_ATTN_FUSED_ROPE=0 (for comparisons): nothing folds, and inductor's cache key
    (the pass's uuid) differs, so a graph compiled with the fold is not reused."""
    from comfy_para_attn.graph_folds import GraphFolds

    folds = GraphFolds()
    key = folds.uuid()
    monkeypatch.setenv("PARA_ATTN_FUSED_ROPE", "0")
    assert folds.uuid() != key
    if kernel_unavailable_reason() is None:
        prep = _AttentionPrep()
        inputs = (_qkv(5, seed=5).permute(1, 3, 0, 2, 4).reshape(1, 5, -1),
                  _qkv(40, seed=6).permute(1, 3, 0, 2, 4).reshape(1, 40, -1), _pe(45))
        (q, _), counts, _ = compiled_with_folds(prep, *inputs)
        assert counts["rope"] == 0 and torch.equal(q, prep(*inputs)[0])


@needs_kernel
@pytest.mark.parametrize("variant,folds", [("cat keywords", 1), ("alpha", 0), ("other reshape", 0)])
def test_look_alike_computations_are_folded_only_when_they_are_the_rotation(variant, folds):
    """`torch.cat(tensors=...)` is the same computation (folded); an `alpha` on the add or
    another final shape is not (left alone, and the compiled graph still runs)."""
    prep = _AttentionPrep(variant)
    inputs = (_qkv(5, seed=5).permute(1, 3, 0, 2, 4).reshape(1, 5, -1),
              _qkv(40, seed=6).permute(1, 3, 0, 2, 4).reshape(1, 40, -1), _pe(45))
    expected, _ = prep(*inputs)
    (q, _), counts, _ = compiled_with_folds(prep, *inputs)
    assert counts["rope"] == folds and q.shape == expected.shape
    if folds:
        _assert_close(q, expected)
    else:
        assert torch.equal(q, expected)


class _QKPrep(torch.nn.Module):
    """A FLUX single block's q and k: one qkv projection split, each normalized with its own
    weight, both rotated by one table (`flux.math.apply_rope`); `early` reads q before k is
    computed (then q and k cannot be one call)."""

    def __init__(self, early=False):
        super().__init__()
        self.early = early
        self.q_weight = torch.nn.Parameter(_weight(3), requires_grad=False)
        self.k_weight = torch.nn.Parameter(_weight(4), requires_grad=False)

    @staticmethod
    def rotate(x, pe, like):
        pairs = x.to(torch.float32).reshape(*x.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(*x.shape).type_as(like)

    def forward(self, qkv, pe):
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q = torch.nn.functional.rms_norm(q, (DIM,), self.q_weight, EPS).to(v)
        q = self.rotate(q, pe, v)
        early = q.sum() if self.early else None
        k = torch.nn.functional.rms_norm(k, (DIM,), self.k_weight, EPS).to(v)
        k = self.rotate(k, pe, v)
        return (q, k) if early is None else (q, k * early)


@needs_kernel
@pytest.mark.parametrize("early", [False, True], ids=["q and k paired", "q read before k"])
def test_q_and_k_on_one_table_become_one_call(early):
    prep = _QKPrep(early)
    inputs = (_qkv(40, seed=5).permute(1, 3, 0, 2, 4).reshape(1, 40, -1), _pe(40))
    expected_q, expected_k = prep(*inputs)
    (q, k), counts, targets = compiled_with_folds(prep, *inputs)
    assert counts["rope"] == 2 and counts["rope pairs"] == (0 if early else 1), counts
    assert ("para_attn.rms_norm_rope_pair.default" in targets) == (not early), targets
    _assert_close(q, expected_q)
    if not early:
        _assert_close(k, expected_k)
    else:  # k times a sum: compare relative to its scale
        assert (k.float() - expected_k.float()).abs().max() <= expected_k.float().abs().max() * 2 ** -6


class _Attend(_QKPrep):
    """`_QKPrep`, then PyTorch's attention and ComfyUI's reshape of its output; with
    `keys_too` the keys are returned as well (as ring attention sends them on)."""

    def __init__(self, keys_too=False):
        super().__init__()
        self.keys_too = keys_too

    def forward(self, qkv, pe):
        q, k = super().forward(qkv, pe)
        v = qkv.view(qkv.shape[0], qkv.shape[1], 3, HEADS, -1)[:, :, 2].transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return (out, k) if self.keys_too else out


@needs_kernel
@pytest.mark.parametrize("attend,switch", [(True, "1"), (False, "1"), (True, "0")],
                         ids=["into attention", "returned", "into attention, switched off"])
def test_queries_only_attention_reads_are_written_sequence_major(attend, switch, monkeypatch):
    """q and k that only PyTorch's attention reads come out as [B, S, H, D] buffers (its output
    then too, and ComfyUI's reshape after it is a view); q and k read by anything else keep
    the contiguous [B, H, S, D] they had (context parallelism's all-to-all splits heads)."""
    from comfy_para_attn.graph_folds import GraphFolds
    from comfy_para_attn.testing.fp8_checks import folding_backend

    key = GraphFolds().uuid()
    monkeypatch.setenv("PARA_ATTN_ROPE_SEQ_MAJOR", switch)
    assert (GraphFolds().uuid() == key) == (switch == "1")  # a graph cached with the other layout is not reused
    prep = _Attend() if attend else _QKPrep()
    inputs = (_qkv(40, seed=5).permute(1, 3, 0, 2, 4).reshape(1, 40, -1), _pe(40))
    expected = prep(*inputs)
    folds, graphs = GraphFolds(), []
    torch._dynamo.reset()
    out = torch.compile(prep, backend=folding_backend(folds, graphs), fullgraph=True)(*inputs)
    calls = [n for g in graphs for n in g.graph.nodes if "rms_norm_rope_pair" in str(n.target)]
    assert len(calls) == 1 and calls[0].args[-1] is (attend and switch == "1"), [c.args for c in calls]
    if attend:
        assert out.is_contiguous() and torch.isfinite(out).all() and expected.abs().mean() > 0.1
        assert (out.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2 ** -6
    else:
        for got, ref in zip(out, expected):
            _assert_close(got, ref)


def test_which_users_leave_the_layout_to_attention(monkeypatch):
    """`feeds_attention_only` on a hand-made graph: reads of the size (dynamic shapes put them
    in graphs) do not count; a value, a keyword argument or any other user does."""
    from comfy_para_attn.rope_fold import feeds_attention_only

    graph = torch.fx.Graph()
    q, k, v, kq, other = (graph.placeholder(name) for name in ("q", "k", "v", "kq", "other"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outs = [graph.call_method("size", (q, 2)), graph.call_method("dim", (k,)),
            graph.call_function(sdpa, (q, k, v)), graph.call_function(sdpa, (kq, kq, kq)),
            graph.call_function(sdpa, (other, k, v)), graph.call_method("transpose", (other, 1, 2))]
    graph.output(tuple(outs))
    assert feeds_attention_only(q) and feeds_attention_only(k)
    assert not feeds_attention_only(v)  # the value: attention's output does not follow its layout
    assert not feeds_attention_only(kq)  # also passed as the value
    assert not feeds_attention_only(other)  # also transposed
    monkeypatch.setenv("PARA_ATTN_ROPE_SEQ_MAJOR", "0")
    assert not feeds_attention_only(q)


@needs_kernel
def test_q_and_k_stay_one_call_when_only_q_may_be_sequence_major():
    """Keys read by something besides attention keep their layout, and then so do the
    queries: the pair kernel writes both one way (one call, not two)."""
    from comfy_para_attn.graph_folds import GraphFolds
    from comfy_para_attn.testing.fp8_checks import folding_backend

    prep = _Attend(keys_too=True)
    inputs = (_qkv(40, seed=5).permute(1, 3, 0, 2, 4).reshape(1, 40, -1), _pe(40))
    expected_out, expected_k = prep(*inputs)
    folds, graphs = GraphFolds(), []
    torch._dynamo.reset()
    out, k = torch.compile(prep, backend=folding_backend(folds, graphs), fullgraph=True)(*inputs)
    calls = [n for g in graphs for n in g.graph.nodes if "rms_norm_rope" in str(n.target)]
    assert len(calls) == 1 and "pair" in str(calls[0].target) and calls[0].args[-1] is False, calls
    _assert_close(k, expected_k)
    assert (out.float() - expected_out.float()).abs().max() <= expected_out.float().abs().max() * 2 ** -6


def test_the_pair_switch_turns_only_the_pairing_off(monkeypatch):
    from comfy_para_attn.graph_folds import GraphFolds

    key = GraphFolds().uuid()
    monkeypatch.setenv("PARA_ATTN_ROPE_PAIRS", "0")
    assert GraphFolds().uuid() != key
    if kernel_unavailable_reason() is None:
        prep = _QKPrep()
        inputs = (_qkv(40, seed=5).permute(1, 3, 0, 2, 4).reshape(1, 40, -1), _pe(40))
        _, counts, _ = compiled_with_folds(prep, *inputs)
        assert counts["rope"] == 2 and counts["rope pairs"] == 0


@pytest.mark.skipif(not torch.cuda.is_available() or kernel_unavailable_reason() is not None,
                    reason="inductor launches our Triton kernels from its own code on CUDA only")
@pytest.mark.parametrize("seq_major", [False, True], ids=["heads major", "sequence major"])
def test_inductor_launches_the_kernel_with_the_same_arithmetic(seq_major):
    """Inductor hands `eps` (a Python float) to the kernel as fp64; the norm must still run in
    fp32 (in fp64 it took 1.9x the time, and its bf16 roundings differed from the eager call's).
    FLUX's shape: 24 heads of 128, 4608 tokens of a single block's qkv."""
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(1, 4608, 3 * 24 * 128, generator=g) * 2 + 0.3).to(torch.bfloat16).cuda()
    q, k, _ = qkv.view(1, 4608, 3, 24, 128).permute(2, 0, 3, 1, 4)
    weights = [(torch.rand(128, generator=g) + 0.5).to(torch.bfloat16).cuda() for _ in range(2)]
    angle = torch.rand(1, 1, 4608, 64, generator=g).cuda() * 6
    pe = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=-1).reshape(1, 1, 4608, 64, 2, 2)

    def pair(q, k, wq, wk, pe):
        return rms_norm_rope_pair([q], [k], [wq], [wk], pe, EPS, seq_major=seq_major)

    eager = pair(q, k, *weights, pe)
    compiled = torch.compile(pair, dynamic=False, fullgraph=True)(q, k, *weights, pe)
    for out, ref in zip(compiled, eager):
        assert torch.isfinite(out).all() and ref.abs().mean() > 0.1
        assert torch.equal(out, ref) and out.stride() == ref.stride()
        assert (out.transpose(1, 2) if seq_major else out).is_contiguous()
