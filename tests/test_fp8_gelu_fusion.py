"""The tanh GELU fused into row-wise fp8 activation quantization (`kernels.fp8_rowwise`,
`comfy_para_attn.quant.gelu_fusion`): the Triton kernel against the plain computation (on
CUDA, or on CPU through Triton's interpreter), and the fused linear layer against torchao's
own dynamic fp8 linear on the same weights."""
import importlib.util
import os
import sys

import pytest
import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if HAVE_TRITON and DEVICE == "cpu" and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # triton reads it when first imported

from comfy_para_attn.quant import gelu_fusion  # noqa: E402
from comfy_para_attn.testing.fp8_checks import activations as _activations  # noqa: E402
from comfy_para_attn.testing.fp8_checks import compiled_with_folds, dynamic_fp8_linear, kernel_unavailable_reason  # noqa: E402
from comfy_para_attn.kernels.fp8_rowwise import gelu_tail_rowwise_fp8_reference  # noqa: E402

needs_kernel = pytest.mark.skipif(kernel_unavailable_reason() is not None, reason=str(kernel_unavailable_reason()))


@needs_kernel
@pytest.mark.parametrize("cols,gelu_from", [(3 * 96, 96), (256, 0), (200, 72)])
def test_kernel_matches_the_plain_quantization(cols, gelu_from):
    from comfy_para_attn.kernels.fp8_rowwise import gelu_tail_rowwise_fp8_triton

    x = _activations(48, cols)
    q, scale = gelu_tail_rowwise_fp8_triton(x, gelu_from)
    q_ref, scale_ref = gelu_tail_rowwise_fp8_reference(x, gelu_from)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (48, 1)
    assert torch.equal(scale, scale_ref)  # amax / 448 rounded to bf16, as torchao computes it
    values, values_ref = q.float(), q_ref.float()
    assert torch.isfinite(values).all() and values.abs().max() == 448  # each row's max maps to 448
    differ = values != values_ref
    # the reciprocal scale (and a GELU one bf16 ulp off) can round a value to the next fp8 step
    assert differ.float().mean() < 2e-3, differ.float().mean()
    step = (values_ref[differ].abs() / 8).clamp(min=2.0 ** -9)  # e4m3: 3 mantissa bits
    assert ((values[differ] - values_ref[differ]).abs() <= step * 1.01).all()
    dequantized = values * scale
    reference = torch.cat((x[:, :gelu_from].float(),
                           torch.nn.functional.gelu(x[:, gelu_from:].float(), approximate="tanh")), 1)
    rel = (dequantized - reference).norm() / reference.norm()
    assert rel < 0.05, rel  # fp8's own rounding error


@needs_kernel
def test_a_row_of_zeros_quantizes_to_zeros():
    from comfy_para_attn.kernels.fp8_rowwise import gelu_tail_rowwise_fp8_triton

    x = _activations(4, 64)
    x[2] = 0
    q, scale = gelu_tail_rowwise_fp8_triton(x, 32)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert (q[2].float() == 0).all() and (q[1].float() != 0).any()


@needs_kernel
@pytest.mark.parametrize("head_cols", [96, 0])
def test_two_pieces_quantize_like_their_concatenation(head_cols):
    """`cat_gelu_rowwise_fp8(head, tail)` reads the pieces where they are (here the tail is a
    strided slice of a wider matrix, as the MLP part of FLUX's linear1 output is) and gives
    the concatenation's result to the bit."""
    from comfy_para_attn.kernels.fp8_rowwise import cat_gelu_rowwise_fp8, gelu_tail_rowwise_fp8_triton

    head = _activations(48, head_cols, seed=4)
    wide = _activations(48, 500, seed=5)
    tail = wide[:, 300:492]
    assert tail.stride(0) == 500
    q, scale = cat_gelu_rowwise_fp8(head, tail)
    q_cat, scale_cat = gelu_tail_rowwise_fp8_triton(torch.cat((head, tail), 1), head_cols)
    assert q.shape == (48, head_cols + 192) and torch.isfinite(scale).all() and (q.float() != 0).any()
    assert torch.equal(scale, scale_cat) and torch.equal(q.view(torch.uint8), q_cat.view(torch.uint8))


def _dynamic_fp8_linear(in_features, out_features, seed=1):
    pytest.importorskip("torchao")
    return dynamic_fp8_linear(in_features, out_features, seed)


@needs_kernel
@pytest.mark.parametrize("gelu_from", [0, 96])
def test_fused_linear_matches_torchao(gelu_from):
    linear = _dynamic_fp8_linear(288, 64)
    assert gelu_fusion.rowwise_dynamic_fp8(linear.weight)
    x = _activations(2 * 24, 288, seed=2).reshape(2, 24, 288)
    activated = torch.cat((x[..., :gelu_from], torch.nn.functional.gelu(x[..., gelu_from:], approximate="tanh")), -1)
    expected = linear(activated)  # torchao: quantize the GELU's output, fp8 matmul
    linear.__class__ = gelu_fusion.fused_class(type(linear), gelu_from)
    fused = linear(x)
    assert fused.shape == expected.shape == (2, 24, 64) and fused.dtype == torch.bfloat16
    assert torch.isfinite(fused).all() and expected.abs().mean() > 1e-2
    rel = (fused.float() - expected.float()).norm() / expected.float().norm()
    assert rel < 1e-2, rel


class _SingleStreamLike(torch.nn.Module):
    """The FLUX single-stream block's GELU -> linear2 shape (the real one is tested in the
    comfyui tier); its forward contains the call `fusion_sites` looks for."""

    def __init__(self, hidden=32, mlp=64):
        super().__init__()
        self.hidden_size = hidden
        self.linear1 = torch.nn.Linear(hidden, hidden + mlp)
        self.mlp_act = torch.nn.GELU(approximate="tanh")
        self.linear2 = torch.nn.Linear(hidden + mlp, hidden)

    def forward(self, x):
        attn, mlp = torch.split(self.linear1(x), [self.hidden_size, self.linear1.out_features - self.hidden_size], -1)
        return self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(64, 32))
        self.plain_gelu = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
        self.single = _SingleStreamLike()

    def forward(self, x):
        return self.single(self.plain_gelu(self.mlp(x)))


def test_patches_apply_and_undo_without_changing_a_plain_model():
    torch.manual_seed(0)
    model = _Model()
    sites = gelu_fusion.fusion_sites(model)
    assert sites == [gelu_fusion.FusionSite("mlp.1", "mlp.2", 0),
                     gelu_fusion.FusionSite("single.mlp_act", "single.linear2", 32)]  # exact GELU: not fused
    x = torch.randn(2, 5, 32)
    expected = model(x)
    gelus = (model.mlp[1], model.single.mlp_act)
    changes = gelu_fusion.patches(model, sites)
    previous = gelu_fusion.apply_patches(model, changes)
    assert isinstance(model.mlp[1], gelu_fusion.GeluMovedOn) and isinstance(model.single.mlp_act, torch.nn.Identity)
    assert isinstance(model.single.linear2, gelu_fusion.GeluThenLinear) and model.single.linear2._para_attn_gelu_from == 32
    assert isinstance(model.mlp[2], torch.nn.Linear) and type(model.mlp[2]) is not type(model.single.linear2)
    assert gelu_fusion.fusion_sites(model) == sites  # found again on the fused model
    assert gelu_fusion.patches(model, sites).keys() == changes.keys()
    assert type(gelu_fusion.patches(model, sites)["mlp.2.__class__"]) is type(changes["mlp.2.__class__"])
    assert torch.equal(model(x), expected)  # plain weights: the layer applies the GELU itself
    gelu_fusion.apply_patches(model, previous)
    assert (model.mlp[1], model.single.mlp_act) == gelus
    assert type(model.mlp[2]) is torch.nn.Linear and type(model.single.linear2) is torch.nn.Linear
    assert torch.equal(model(x), expected)


@needs_kernel
def test_fused_sites_compile_as_one_graph_for_every_block():
    """The fused layer inside compiled blocks: no graph break (torchao's weight, the custom op
    and `_scaled_mm` all trace), the same output as eager, and one graph for all blocks (a
    per-layer object in the call path recompiled every block, then ran them eager)."""
    from torch._dynamo.testing import CompileCounter

    blocks = [torch.nn.Sequential(torch.nn.GELU(approximate="tanh"), _dynamic_fp8_linear(288, 64, seed=s))
              for s in (1, 2, 3)]
    for block in blocks:
        gelu_fusion.apply_patches(block, gelu_fusion.patches(block, [gelu_fusion.FusionSite("0", "1", 0)]))
        assert isinstance(block[0], torch.nn.Identity)
    x = _activations(24, 288, seed=3).reshape(1, 24, 288)
    eager = [block(x) for block in blocks]
    torch._dynamo.reset()
    counter = CompileCounter()
    for block, expected in zip(blocks, eager):
        out = torch.compile(block, backend=counter, fullgraph=True)(x)
        assert torch.isfinite(out).all() and torch.equal(out, expected)
    assert counter.frame_count == 1, counter.frame_count


def _fused_single_block(seed=1):
    """A single-stream-like block (`linear2(cat((attn, gelu(mlp)), 2))`) with dynamic fp8
    `linear2` and the GELU fused, as FP8 Quantize leaves FLUX's."""
    block = _SingleStreamLike(hidden=96, mlp=192).to(torch.bfloat16).to(DEVICE)
    block.linear2 = _dynamic_fp8_linear(288, 96, seed=seed)
    gelu_fusion.apply_patches(block, gelu_fusion.patches(block, gelu_fusion.fusion_sites(block)))
    assert isinstance(block.linear2, gelu_fusion.GeluThenLinear)
    return block


@needs_kernel
def test_cat_fold_pass_rewrites_dynamo_graph_and_keeps_the_output():
    """The pre-grad pass on dynamo's real graph of a fused single block: the cat and the
    one-input quantization are replaced by the two-piece op, and the graph computes the same
    bits as eager."""
    block = _fused_single_block()
    x = _activations(24, 96, seed=6).reshape(1, 24, 96)
    expected = block(x)
    out, counts, targets = compiled_with_folds(block, x)
    assert counts == {"cat": 1, "layer norm": 0, "rope": 0, "rope pairs": 0}
    assert "para_attn.cat_gelu_rowwise_fp8.default" in targets and "<built-in method cat" not in " ".join(targets)
    assert not any("gelu_tail_rowwise_fp8" in t for t in targets)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3 and torch.equal(out, expected)


@needs_kernel
def test_compile_settings_run_the_pass_in_inductor():
    """`CompileSettings` hands the pass to inductor, which runs it on a fused block."""
    from comfy_para_attn.compile import CompileSettings, inductor_options

    block = _fused_single_block(seed=2)
    x = _activations(24, 96, seed=7).reshape(1, 24, 96)
    expected = block(x)
    fold = inductor_options()["pre_grad_custom_pass"]
    before = fold.folded
    from torch._inductor.utils import fresh_cache

    torch._dynamo.reset()
    with torch.no_grad(), fresh_cache():  # as ComfyUI samples; a cached graph would skip the pass
        out = torch.compile(block, **CompileSettings(fullgraph=True).compile_kwargs())(x)
    assert fold.folded == before + 1
    assert torch.isfinite(out).all()
    rel = (out.float() - expected.float()).norm() / expected.float().norm()
    assert rel < 1e-2, rel  # inductor's own linear1 may round differently from eager's


@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "wan"])
def test_comfy_models_fusion_sites_and_unchanged_sampling(cm, family):
    """comfyui tier: the sites in ComfyUI's own blocks (FLUX / HunyuanVideo: both MLPs of each
    double block and every single block; Wan: each block's feed-forward), and sampling with
    them installed on plain weights is bit for bit the same as without."""
    patcher = cm.build(family, seed=0)
    dm = patcher.model.diffusion_model
    sites = gelu_fusion.fusion_sites(dm)
    if family == "wan":
        expected = {f"blocks.{i}.ffn.2" for i in range(len(dm.blocks))} | {"text_embedding.2"}  # fp8 excludes it
    else:
        expected = ({f"double_blocks.{i}.{s}_mlp.2" for i in range(len(dm.double_blocks)) for s in ("img", "txt")}
                    | {f"single_blocks.{i}.linear2" for i in range(len(dm.single_blocks))})
    assert {s.linear for s in sites} == expected
    singles = [s for s in sites if s.linear.endswith("linear2")]
    assert all(s.gelu_from == dm.single_blocks[0].hidden_size for s in singles)
    if family != "wan" and hasattr(dm.single_blocks[0], "yak_mlp"):  # newer ComfyUI: its gated single-block MLP
        dm.single_blocks[0].yak_mlp = True
        assert "single_blocks.0.linear2" not in {s.linear for s in gelu_fusion.fusion_sites(dm)}
        dm.single_blocks[0].yak_mlp = False
    norm_fed = gelu_fusion.norm_fed_sites(dm)
    if family == "wan":
        assert norm_fed == []
    else:
        assert {s.linear for s in norm_fed} == (
            {f"double_blocks.{i}.{s}_{layer}" for i in range(len(dm.double_blocks)) for s in ("img", "txt")
             for layer in ("attn.qkv", "mlp.0")} | {f"single_blocks.{i}.linear1" for i in range(len(dm.single_blocks))})
        assert all(s.gelu == "" and s.gelu_from == dm.single_blocks[0].hidden_size for s in norm_fed)
    outputs = gelu_fusion.attention_output_sites(dm)
    assert {s.linear for s in outputs} == (set() if family == "wan" else {
        f"double_blocks.{i}.{s}_attn.proj" for i in range(len(dm.double_blocks)) for s in ("img", "txt")})
    assert all(s.gelu == "" and s.gelu_from == dm.single_blocks[0].hidden_size for s in outputs)
    sites += norm_fed + outputs
    shape = cm.latent_shape(family)
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    positive = cm.conditioning(patcher, seed=1)
    reference = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
    previous = gelu_fusion.apply_patches(dm, gelu_fusion.patches(dm, sites))
    try:
        fused = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
    finally:
        gelu_fusion.apply_patches(dm, previous)
    assert torch.isfinite(fused).all() and reference.abs().mean() > 1e-3
    assert torch.equal(fused, reference)


def test_fp8_node_fuses_through_object_patches_that_comfy_applies_per_load(cm):
    """comfyui tier: FP8 Quantize (dynamic row-wise) adds the fusion as object patches, so
    ComfyUI applies them at every load (also when the loaded model is reused by the next
    prompt) and undoes them for a plain clone; another mode drops them; they never travel to
    pool workers (which re-apply FP8 Quantize). On CPU the weights fall back to weight-only
    fp8, where the fused layers apply the GELU themselves."""
    import comfy.patcher_extension

    from comfy_para_attn.adapters.comfy.fp8 import _is_fusion_patch, apply_fp8
    from comfy_para_attn.adapters.comfy.portable import portable_object_patches
    from comfy_para_attn.quant import FP8Settings

    patcher = cm.build("flux", dtype=torch.bfloat16, seed=0, **cm.flux_config("tiny"))
    dm = patcher.model.diffusion_model
    model = apply_fp8(patcher, FP8Settings())
    fusion = {k: v for k, v in model.object_patches.items() if _is_fusion_patch(v)}
    # 2 double blocks x 2 MLPs + 2 single blocks: a GELU slot and a class each; the norm-fed
    # layers (4 per double block, 1 per single block) and attention outputs (2 per double
    # block): a class each
    assert len(fusion) == 2 * 6 + 10 + 4
    assert portable_object_patches(model.object_patches) == {}
    assert not [k for k, v in apply_fp8(model, FP8Settings(mode="weight-only")).object_patches.items()
                if _is_fusion_patch(v)]
    assert not [k for k, v in apply_fp8(model, FP8Settings(granularity="tensor-wise")).object_patches.items()
                if _is_fusion_patch(v)]
    seen = []
    model.add_callback(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN,
                       lambda p: seen.append(sum(isinstance(m, gelu_fusion.GeluThenLinear) for m in dm.modules())))
    positive = cm.conditioning(patcher, seed=1)
    latent = torch.randn(cm.latent_shape("flux"), generator=torch.Generator().manual_seed(3))
    reference = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
    assert not any(isinstance(m, gelu_fusion.GeluThenLinear) for m in dm.modules())
    first = cm.sample(model, positive, [], latent, steps=2, cfg=1.0)
    second = cm.sample(model, positive, [], latent, steps=2, cfg=1.0)  # the loaded model, reused
    assert seen == [20, 20], seen
    plain_again = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
    assert not any(isinstance(m, gelu_fusion.GeluThenLinear) for m in dm.modules())
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert torch.equal(plain_again, reference) and not torch.equal(first, reference)  # fp8 weights differ
