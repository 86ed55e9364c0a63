"""The modulated LayerNorm folded into row-wise fp8 activation quantization
(`kernels.fp8_rowwise.layer_norm_modulate_rowwise_fp8`, `comfy_para_attn.quant.norm_fold`):
the Triton kernel against the plain computation (on CUDA, or on CPU through Triton's
interpreter), the graph pass on dynamo's graph of a FLUX-like block and of ComfyUI's own
FLUX blocks (comfyui tier)."""
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
from comfy_para_attn.testing.fp8_checks import (activations, compiled_with_folds, folding_backend,  # noqa: E402
                                                kernel_unavailable_reason, make_dynamic_fp8, make_fused_layers_fp8)
from comfy_para_attn.kernels.fp8_rowwise import (layer_norm_modulate_rowwise_fp8, layer_norm_modulate_rowwise_fp8_reference,  # noqa: E402
                                 why_not_norm_kernel)

needs_kernel = pytest.mark.skipif(kernel_unavailable_reason() is not None, reason=str(kernel_unavailable_reason()))
EPS = 1e-6


def _inputs(batch, tokens, features, mod_batch, seed=0):
    """x [batch, tokens, features] with an offset (LayerNorm must remove it), and (mul, shift)
    as FLUX makes them: strided slices of one modulation vector per batch."""
    x = (activations(batch * tokens, features, seed=seed) + 0.7).reshape(batch, tokens, features)
    mod = activations(mod_batch, 2 * features, seed=seed + 1).reshape(mod_batch, 1, 2 * features)
    shift, scale = mod.chunk(2, dim=-1)
    return x, 1 + scale, shift


def _assert_close_to_reference(q, scale, q_ref, scale_ref, x, mul, shift):
    assert q.dtype == torch.float8_e4m3fn and q.shape == q_ref.shape and scale.shape == scale_ref.shape
    values, values_ref = q.float(), q_ref.float()
    assert torch.isfinite(values).all() and torch.isfinite(scale).all() and values.abs().amax() == 448
    # the same bf16 roundings in another order can move a value to the next fp8 step, rarely
    assert (scale - scale_ref).abs().max() <= scale_ref.abs().max() * 2 ** -7
    differ = values != values_ref
    assert differ.float().mean() < 5e-3, differ.float().mean()
    step = (values_ref[differ].abs() / 8).clamp(min=2.0 ** -9)  # e4m3: 3 mantissa bits
    assert ((values[differ] - values_ref[differ]).abs() <= step * 1.01).all()
    truth = torch.addcmul(shift.float(), torch.nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=EPS), mul.float())
    truth = truth.reshape(-1, x.shape[-1])
    rel = (values * scale - truth).norm() / truth.norm()
    assert rel < 0.05, rel  # fp8's own rounding error


@needs_kernel
@pytest.mark.parametrize("batch,tokens,features,mod_batch", [(2, 24, 96, 2), (2, 25, 200, 1), (1, 7, 64, 1)])
def test_kernel_matches_the_plain_computation(batch, tokens, features, mod_batch):
    """Batches with their own modulation or one shared, odd token counts and widths."""
    x, mul, shift = _inputs(batch, tokens, features, mod_batch)
    assert why_not_norm_kernel(x, mul, shift) is None and shift.stride(0) == 2 * features
    q, scale = layer_norm_modulate_rowwise_fp8(x, mul, shift, EPS)
    _assert_close_to_reference(q, scale, *layer_norm_modulate_rowwise_fp8_reference(x, mul, shift, EPS), x, mul, shift)


@needs_kernel
def test_the_op_copies_inputs_with_strided_features():
    """HunyuanVideo's first image tokens come transposed ([B, S, K] with strides (S K, 1, S));
    the graph pass folds them all the same and the op copies them (reading them as rows gave
    a 49% error on ComfyUI's HunyuanVideo before it did)."""
    from comfy_para_attn.kernels import triton_fp8_rowwise  # noqa: F401  registers the op

    x, mul, shift = _inputs(1, 32, 64, 1)
    transposed = x.transpose(1, 2).contiguous().transpose(1, 2)
    assert transposed.stride() == (64 * 32, 1, 32) and torch.equal(transposed, x)
    assert "row-major" in why_not_norm_kernel(transposed, mul, shift)
    assert why_not_norm_kernel(transposed, mul, shift, any_strides=True) is None
    q, scale = torch.ops.para_attn.layer_norm_modulate_rowwise_fp8(transposed, mul, shift, EPS)
    q_rows, scale_rows = torch.ops.para_attn.layer_norm_modulate_rowwise_fp8(x, mul, shift, EPS)
    assert torch.isfinite(scale).all() and (q.float() != 0).any()
    assert torch.equal(scale, scale_rows) and torch.equal(q.view(torch.uint8), q_rows.view(torch.uint8))


def test_inputs_the_kernel_cannot_take_fall_back_to_the_plain_computation():
    x, mul, shift = _inputs(2, 8, 64, 2)
    assert "not one vector per batch" in why_not_norm_kernel(x, mul[:, 0], shift)
    assert "not one vector per batch" in why_not_norm_kernel(x, mul.expand(2, 8, 64), shift)
    assert "dims" in why_not_norm_kernel(x[0], mul, shift)
    assert "float32" in why_not_norm_kernel(x, mul.float(), shift)
    q, scale = layer_norm_modulate_rowwise_fp8(x, mul, shift.float(), EPS)
    q_ref, scale_ref = layer_norm_modulate_rowwise_fp8_reference(x, mul, shift.float(), EPS)
    assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


class _NormFedBlock(torch.nn.Module):
    """FLUX's single block up to `linear1`: `linear1(addcmul(shift, pre_norm(x), 1 + scale))`
    with the modulation from a vector (ComfyUI's real blocks run in the comfyui tier)."""

    def __init__(self, features=96, out=160, affine=False):
        super().__init__()
        self.pre_norm = torch.nn.LayerNorm(features, elementwise_affine=affine, eps=EPS)
        self.mod = torch.nn.Linear(features, 2 * features)
        self.linear1 = torch.nn.Linear(features, out)

    def forward(self, x, vec):
        shift, scale = self.mod(torch.nn.functional.silu(vec))[:, None, :].chunk(2, dim=-1)
        return self.linear1(torch.addcmul(shift, self.pre_norm(x), 1 + scale))


def _fp8_block(affine=False, seed=0):
    pytest.importorskip("torchao")
    torch.manual_seed(seed)
    block = _NormFedBlock(affine=affine).to(torch.bfloat16).to(DEVICE)
    make_dynamic_fp8(block.linear1)
    sites = [gelu_fusion.FusionSite("", "linear1", 96)]
    assert affine or gelu_fusion.norm_fed_sites(block) == sites
    gelu_fusion.apply_patches(block, gelu_fusion.patches(block, sites))
    assert isinstance(block.linear1, gelu_fusion.GeluThenLinear)
    return block


@needs_kernel
def test_fold_rewrites_dynamo_graph_and_keeps_the_output():
    block = _fp8_block()
    x = (activations(2 * 24, 96, seed=3) + 0.5).reshape(2, 24, 96)
    vec = activations(2, 96, seed=4)
    expected = block(x, vec)  # eager: LayerNorm and addcmul in torch, then the quantization kernel
    out, counts, targets = compiled_with_folds(block, x, vec)
    assert counts == {"layer norm": 1, "cat": 0, "rope": 0, "rope pairs": 0}
    assert "para_attn.layer_norm_modulate_rowwise_fp8.default" in targets
    assert not any("layer_norm" in t and "para_attn" not in t for t in targets) and "<built-in method addcmul" not in " ".join(targets)
    assert not any("gelu_tail_rowwise_fp8" in t for t in targets)
    assert out.shape == expected.shape == (2, 24, 160) and torch.isfinite(out).all() and expected.abs().mean() > 1e-2
    rel = (out.float() - expected.float()).norm() / expected.float().norm()
    assert rel < 5e-3, rel  # one bf16 rounding apart at most, now and then: a few fp8 steps in the sum


@needs_kernel
def test_a_layer_norm_with_affine_parameters_is_left_alone():
    block = _fp8_block(affine=True)
    with torch.no_grad():
        block.pre_norm.weight.uniform_(0.5, 1.5)
    x = activations(24, 96, seed=5).reshape(1, 24, 96)
    vec = activations(1, 96, seed=6)
    expected = block(x, vec)
    out, counts, targets = compiled_with_folds(block, x, vec)
    assert counts == {"layer norm": 0, "cat": 0, "rope": 0, "rope pairs": 0} and any("para_attn.gelu_tail_rowwise_fp8" in t for t in targets)
    assert torch.isfinite(out).all() and torch.equal(out, expected)


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_comfy_flux_blocks_fold_every_norm_and_sample_the_same(cm, family):
    """comfyui tier: ComfyUI's own FLUX / HunyuanVideo blocks with dynamic fp8 weights on the
    fused layers: compiled, every modulated LayerNorm (4 per double block, 1 per single block),
    the single block's cat and the q/k RMSNorm + rotary embedding fold, and sampling gives
    what the same blocks give eager."""
    pytest.importorskip("torchao")
    if DEVICE != "cpu" or kernel_unavailable_reason():  # this tier's ComfyUI runs with --cpu
        pytest.skip(kernel_unavailable_reason() or "the CPU model runs the kernels on Triton's interpreter only")
    patcher = cm.build(family, dtype=torch.bfloat16, seed=0, **(cm.flux_config("tiny") if family == "flux" else {}))
    cm.use_sdpa_attention(patcher)  # ComfyUI's CPU attention asks psutil for free memory: a graph break
    dm = patcher.model.diffusion_model
    make_fused_layers_fp8(dm)
    positive = cm.conditioning(patcher, seed=1)
    latent = torch.randn(cm.latent_shape(family), generator=torch.Generator().manual_seed(3))
    eager = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)

    from comfy_para_attn.graph_folds import GraphFolds

    folds = GraphFolds()
    backend = folding_backend(folds)  # one backend for every block: a new one per block would recompile
    torch._dynamo.reset()
    blocks = list(dm.double_blocks) + list(dm.single_blocks)
    for block in blocks:
        block.compile(backend=backend, fullgraph=True)
    try:
        compiled = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
    finally:
        for block in blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    # one graph per block class: 4 norm-fed layers and q, k in a double block, linear1, its cat, q, k in a single one
    assert folds.counts == {"layer norm": 4 + 1, "cat": 1, "rope": 2 + 2, "rope pairs": 1 + 1}, folds.counts
    assert torch.isfinite(compiled).all() and eager.abs().mean() > 1e-3
    rel = (compiled.float() - eager.float()).norm() / eager.float().norm()
    assert rel < 2e-2, rel


@pytest.mark.skipif(not torch.cuda.is_available() or kernel_unavailable_reason() is not None,
                    reason="inductor launches our Triton kernels from its own code on CUDA only")
def test_inductor_launches_the_kernel_with_the_same_arithmetic():
    """Inductor hands `eps` (a Python float) to the kernel as fp64; the LayerNorm must still run
    in fp32, as the eager call does: the same fp8 values and scales, bit for bit."""
    x, mul, shift = _inputs(1, 4608, 3072, 1, seed=5)
    eager = layer_norm_modulate_rowwise_fp8(x, mul, shift, EPS)
    compiled = torch.compile(lambda *a: layer_norm_modulate_rowwise_fp8(*a, EPS), dynamic=False,
                             fullgraph=True)(x, mul, shift)
    assert torch.isfinite(compiled[1]).all() and compiled[0].float().abs().amax() == 448
    assert torch.equal(compiled[0].view(torch.uint8), eager[0].view(torch.uint8))
    assert torch.equal(compiled[1], eager[1])
