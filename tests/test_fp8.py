"""Unit tier (CPU, no ComfyUI): FP8 settings, exclusion patterns, layer selection, the CPU
fallback plan and torchao's weight-only fp8 on a plain linear layer."""
import logging

import pytest
import torch

from comfy_para_attn.quant import (DEFAULT_EXCLUDE, FP8Settings, is_excluded, parse_patterns, plan_for,
                                   quantizable_linears, stored_fp8_scale)


class ToyDiT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img_in = torch.nn.Linear(16, 32)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({
            "img_mod": torch.nn.ModuleDict({"lin": torch.nn.Linear(32, 64)}),
            "qkv": torch.nn.Linear(32, 96), "odd": torch.nn.Linear(32, 20)}) for _ in range(2))
        self.final_layer = torch.nn.ModuleDict({"linear": torch.nn.Linear(32, 16)})


def test_patterns():
    assert parse_patterns(" a, b.* ,,c\n d ") == ("a", "b.*", "c", "d")
    with pytest.raises(ValueError, match="space"):
        FP8Settings(exclude="img_in final_layer")
    with pytest.raises(ValueError):
        FP8Settings(mode="int8")
    patterns = parse_patterns(DEFAULT_EXCLUDE)
    assert is_excluded("final_layer.linear", patterns) and is_excluded("double_blocks.3.img_mod.lin", patterns)
    assert is_excluded("single_blocks.0.modulation.lin", patterns) and is_excluded("txt_in", patterns)
    assert is_excluded("final_layer.adaLN_modulation.1", patterns)
    assert not is_excluded("double_blocks.3.img_attn.qkv", patterns) and not is_excluded("single_blocks.0.linear1",
                                                                                          patterns)
    assert not is_excluded("txt_in_other", patterns)  # whole-name globs, not substrings


def test_layer_selection():
    toy = ToyDiT()
    names = [n for n, _ in quantizable_linears(toy, FP8Settings().patterns)]
    assert names == ["blocks.0.qkv", "blocks.1.qkv"]  # embedder, modulation, final excluded; 20 % 16 != 0
    assert len(quantizable_linears(toy, ())) == 1 + 2 * 2 + 1
    assert [n for n, _ in quantizable_linears(toy, ("blocks.0*",) + FP8Settings().patterns)] == ["blocks.1.qkv"]
    toy.blocks[1].qkv.to(torch.float8_e5m2)
    assert [n for n, _ in quantizable_linears(toy, FP8Settings().patterns)] == ["blocks.0.qkv"]  # e5m2: no
    toy.blocks[1].qkv.to(torch.float8_e4m3fn)  # what fp8 checkpoints store: taken as it is
    assert [n for n, _ in quantizable_linears(toy, FP8Settings().patterns)] == ["blocks.0.qkv", "blocks.1.qkv"]
    assert stored_fp8_scale(toy.blocks[1].qkv).item() == 1.0 and stored_fp8_scale(toy.blocks[0].qkv) is None
    toy.blocks[1].qkv.scale_weight = torch.nn.Parameter(torch.tensor(0.25), requires_grad=False)
    assert stored_fp8_scale(toy.blocks[1].qkv).item() == 0.25


def test_cpu_plan_falls_back_to_weight_only():
    plan = plan_for(FP8Settings(), "cpu", torch.bfloat16)
    assert plan.mode == "weight-only" and "compute capability >= 8.9" in plan.note and "CPU" in plan.note
    assert plan_for(FP8Settings(mode="weight-only"), "cpu", torch.float32).note is None
    assert not FP8Settings(mode="off").enabled


@pytest.mark.parametrize("granularity", ["row-wise", "tensor-wise"])
def test_torchao_weight_only_on_cpu(granularity):
    pytest.importorskip("torchao", reason="torchao is a runtime dependency (pyproject); not installed here")
    from comfy_para_attn.quant import is_quantized, quantize_linear

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    reference = layer(x)
    plan = plan_for(FP8Settings(granularity=granularity), "cpu", torch.bfloat16)
    quantize_linear(layer, plan.torchao_config())
    assert is_quantized(layer.weight) and not is_quantized(torch.zeros(1))
    out = layer(x)
    rel = (out - reference).float().abs().mean() / reference.float().abs().mean()
    assert 0 < rel < 0.08, rel  # e4m3 rounding of the weights only


@pytest.mark.parametrize("granularity", ["row-wise", "tensor-wise"])
def test_stored_fp8_weights_are_quantized_without_a_second_rounding(granularity):
    """A layer stored as fp8 x scale (fp8 checkpoints): the quantized weight holds the very
    fp8 bytes and the scale in every row, so it computes with the stored weight (fp32 sums
    apart), where quantizing the dequantized weight again rounds a second time."""
    pytest.importorskip("torchao", reason="torchao is a runtime dependency (pyproject); not installed here")
    from comfy_para_attn.quant import quantize_linear, quantize_stored_fp8

    torch.manual_seed(0)
    weight = torch.randn(32, 64) * torch.rand(32, 1) * 3  # rows of different magnitude
    scale = weight.abs().amax() / 400  # not torchao's amax / 448: a requantization rounds again
    stored = (weight / scale).to(torch.float8_e4m3fn)
    x = torch.randn(5, 64)
    reference = x @ (stored.float() * scale).t()
    config = plan_for(FP8Settings(granularity=granularity), "cpu", torch.float32).torchao_config()
    layer = torch.nn.Linear(64, 32, bias=False)
    layer.weight = torch.nn.Parameter(stored, requires_grad=False)
    layer.scale_weight = torch.nn.Parameter(scale, requires_grad=False)
    assert quantize_stored_fp8(layer, config, torch.float32)
    assert torch.equal(layer.weight.qdata.view(torch.uint8), stored.view(torch.uint8))
    assert torch.all(layer.weight.scale == scale)
    out = layer(x)
    assert torch.isfinite(out).all() and (out - reference).abs().max() < 1e-5 * reference.abs().max()
    requantized = torch.nn.Linear(64, 32, bias=False)  # the dequantized weight through torchao again
    requantized.weight = torch.nn.Parameter(stored.float() * scale, requires_grad=False)
    quantize_linear(requantized, config)
    assert (requantized(x) - reference).abs().max() > 1e-3 * reference.abs().max()
