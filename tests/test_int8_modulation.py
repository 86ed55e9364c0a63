"""Int8-weight linear layers for the modulation projections: the Triton kernel (on CUDA, or on
CPU through Triton's interpreter) against the plain computation, the layer selection and the
class swap (`comfy_para_attn.quant.modulation`). ComfyUI's own models: tests/test_fp8_comfy.py."""
import importlib.util
import os
import sys

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if HAVE_TRITON and DEVICE == "cpu" and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported

from comfy_para_attn.quant import modulation  # noqa: E402
from comfy_para_attn.testing.fp8_checks import kernel_unavailable_reason  # noqa: E402
from comfy_para_attn.kernels.int8_linear import int8_linear, int8_linear_reference, quantize_weight_int8, why_not_triton  # noqa: E402

needs_kernel = pytest.mark.skipif(kernel_unavailable_reason() is not None, reason=str(kernel_unavailable_reason()))


def _weight(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.04
    w[3] *= 20  # one row with a large range: per-row scales keep the others fine
    return w.to(torch.bfloat16)


def _input(m, k, seed=1, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g) * 1.5 + 0.2).to(dtype)


def test_weight_quantization_error_is_a_percent_of_each_row(monkeypatch):
    from comfy_para_attn.kernels import int8_linear as module

    monkeypatch.setattr(module, "_QUANTIZE_ROWS", 7)  # slices that do not divide the rows
    w = _weight(48, 96).float()
    w8, scale = quantize_weight_int8(w)
    assert w8.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert w8.abs().amax(dim=1).eq(127).all()  # every row uses the full range
    err = (w8.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()  # rounded to nearest
    rows = torch.linalg.vector_norm(err, dim=1) / torch.linalg.vector_norm(w, dim=1)
    assert rows.max() < 0.02, rows.max()


@needs_kernel
@pytest.mark.parametrize("rows,bias,dtype", [(1, True, torch.bfloat16), (2, False, torch.bfloat16),
                                             (8, True, torch.bfloat16), (3, True, torch.float16)])
def test_kernel_matches_the_plain_computation(rows, bias, dtype):
    n, k = 80, 112  # neither a multiple of the kernel's tiles
    w8, scale = quantize_weight_int8(_weight(n, k))
    b = (torch.randn(n) * 0.3).to(dtype) if bias else None
    x = _input(rows, k, dtype=dtype)
    w8, scale, x = w8.to(DEVICE), scale.to(DEVICE), x.to(DEVICE)
    b = b.to(DEVICE) if b is not None else None
    assert why_not_triton(x, w8, scale, b) is None
    out = int8_linear(x, w8, scale, b)
    ref = int8_linear_reference(x, w8, scale, b)
    assert out.dtype == dtype and out.shape == (rows, n) and torch.isfinite(out).all()
    assert ref.abs().amax() > 1  # not a test on zeros
    # fp32 sums in another order, then one rounding to the output dtype: at most one ulp apart
    ulp = ref.float().abs().clamp_min(1e-3) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
    assert ((out.float() - ref.float()).abs() <= ulp).all()
    # against the bf16 weights: each weight is off by at most half its row's step
    exact = torch.nn.functional.linear(x.float(), _weight(n, k).float().to(DEVICE), None if b is None else b.float())
    bound = x.float().abs().sum(-1, keepdim=True) * scale / 2 + exact.abs() * 2 ** -7
    assert ((out.float() - exact).abs() <= bound).all()


@needs_kernel
def test_leading_dims_are_kept():
    w8, scale = quantize_weight_int8(_weight(32, 64))
    x = _input(6, 64).reshape(2, 3, 64)
    out = int8_linear(x.to(DEVICE), w8.to(DEVICE), scale.to(DEVICE))
    assert out.shape == (2, 3, 32)
    flat = int8_linear_reference(x.reshape(6, 64), w8, scale).reshape(2, 3, 32)
    assert torch.allclose(out.cpu().float(), flat.float(), rtol=2 ** -7, atol=1e-3)


def test_inputs_the_kernel_cannot_take_use_the_plain_computation():
    w8, scale = quantize_weight_int8(_weight(16, 32))
    w8, scale = w8.to(DEVICE), scale.to(DEVICE)
    x = _input(2, 32, dtype=torch.float32).to(DEVICE)
    assert "dtype" in why_not_triton(x, w8, scale, None)
    assert torch.equal(int8_linear(x, w8, scale), int8_linear_reference(x, w8, scale))
    many = _input(20, 32).to(DEVICE)  # more rows than the kernel takes: dequantize, then one matmul
    assert "rows" in why_not_triton(many, w8, scale, None)
    out, ref = int8_linear(many, w8, scale), int8_linear_reference(many, w8, scale)
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -6, atol=1e-2)
    assert int8_linear(many[:0], w8, scale).shape == (0, 16)


class _Block(torch.nn.Module):
    """Names as in ComfyUI's FLUX blocks."""

    def __init__(self, dim=32):
        super().__init__()
        self.img_mod = torch.nn.Module()
        self.img_mod.lin = torch.nn.Linear(dim, 6 * dim)
        self.modulation = torch.nn.Module()
        self.modulation.lin = torch.nn.Linear(dim, 3 * dim)
        self.img_attn = torch.nn.Module()
        self.img_attn.qkv = torch.nn.Linear(dim, 3 * dim)

    def forward(self, x, vec):
        v = torch.nn.functional.silu(vec)
        return self.img_attn.qkv(x) * self.img_mod.lin(v)[:, None, : 3 * x.shape[-1]] + self.modulation.lin(v)[:, None]


def _model(seed=0):
    torch.manual_seed(seed)
    root = torch.nn.Module()
    root.double_blocks = torch.nn.ModuleList([_Block(), _Block()])
    root.final_layer = torch.nn.Module()
    root.final_layer.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(32, 64))
    return root.to(torch.bfloat16)


def test_selection_takes_modulation_layers_that_stay_out_of_fp8():
    from comfy_para_attn.quant import DEFAULT_EXCLUDE, parse_patterns

    root = _model()
    names = [n for n, _ in modulation.modulation_linears(root, parse_patterns(DEFAULT_EXCLUDE))]
    assert names == [f"double_blocks.{i}.{m}.lin" for i in range(2) for m in ("img_mod", "modulation")] + [
        "final_layer.adaLN_modulation.1"]
    # a modulation layer the user lets fp8 take is not also made int8
    names = [n for n, _ in modulation.modulation_linears(root, parse_patterns("final_layer"))]
    assert names == ["final_layer.adaLN_modulation.1"]


@needs_kernel
def test_class_swap_runs_int8_while_the_weight_is_int8_and_the_layer_otherwise():
    from comfy_para_attn.quant import gelu_fusion

    root = _model().to(DEVICE)
    block = root.double_blocks[0]
    x, vec = _input(10, 32).reshape(1, 10, 32).to(DEVICE), _input(1, 32, seed=5).to(DEVICE)
    plain = block(x, vec)
    layers = modulation.modulation_linears(root, ("*_mod", "*modulation*", "final_layer"))
    originals = {name: module.weight for name, module in layers}
    previous = gelu_fusion.apply_patches(root, modulation.patches(layers))
    assert torch.equal(block(x, vec), plain)  # class swapped, weight still bf16: the layer's own forward
    for _, module in layers:
        modulation.to_int8(module)
    assert all(modulation.is_int8(m) for _, m in layers)
    quantized = block(x, vec)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, plain)
    assert (quantized - plain).float().norm() / plain.float().norm() < 0.03
    lin = block.img_mod.lin
    v = torch.nn.functional.silu(vec)
    assert torch.equal(lin(v), int8_linear(v, lin.weight, lin.para_attn_int8_scale, lin.bias))
    gelu_fusion.apply_patches(root, previous)  # what ComfyUI's unpatch does: classes and weights back
    for name, module in layers:
        module.weight = originals[name]
    assert type(lin) is torch.nn.Linear and torch.equal(block(x, vec), plain)


@needs_kernel
def test_compiled_block_has_no_graph_break_and_matches_eager():
    from comfy_para_attn.quant import gelu_fusion

    root = _model().to(DEVICE)
    layers = modulation.modulation_linears(root, ("*_mod", "*modulation*", "final_layer"))
    gelu_fusion.apply_patches(root, modulation.patches(layers))
    for _, module in layers:
        modulation.to_int8(module)
    block = root.double_blocks[1]
    x, vec = _input(10, 32).reshape(1, 10, 32).to(DEVICE), _input(1, 32, seed=5).to(DEVICE)
    with torch.no_grad():  # as ComfyUI samples
        eager = block(x, vec)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(block)(x, vec)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(x, vec)
    assert torch.equal(compiled, eager)
