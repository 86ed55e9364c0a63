"""FP8 Quantize on a CUDA ComfyUI (gpu tier; skipped without CUDA or ComfyUI)."""
import pytest
import torch

from comfy_para_attn.testing.distributed import run_ranks
from comfy_para_attn.testing.fp8_checks import (folds_against_eager_on_cuda, fp8_round_trip_on_cuda,
                                                short_prompt_fp8_on_cuda, stored_fp8_on_cuda)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fp8_load_backs_up_the_host_weights_and_restores_them(comfyui_path):
    pytest.importorskip("torchao")
    (result,) = run_ranks(fp8_round_trip_on_cuda, 1, str(comfyui_path), timeout=600)
    first, again, twin = result["loads"]
    assert first["device"].startswith("cuda")
    # every quantized layer's backup is the host tensor it was loaded from, not a copy
    assert first["held_backups"] == 20 and again["held_backups"] == 20
    # the GELU in front of each fp8 MLP output layer is fused into its activation quantization,
    # and the layers fed by a modulated LayerNorm get the same class (tiny FLUX, 2 double and 2
    # single blocks: 6 GELU sites, 10 norm-fed layers); the plain run restores them
    assert first["fused_layers"] == again["fused_layers"] == twin["fused_layers"] == 20, result["loads"]
    assert result["fused_after_restore"] == 0
    assert twin["held_backups"] == 0  # the twin ran plain first: its weights were on the GPU, copied
    assert result["finite"] and 0 < result["fp8_differs"] < 0.1 and result["fp8_repeats"]
    assert result["same_weights"] and result["same_output"]


def test_graph_folds_on_real_blocks_add_no_error_to_compiled_sampling(comfyui_path):
    """ComfyUI's FLUX and HunyuanVideo blocks with dynamic fp8 on the fused layers, compiled by
    inductor with our graph pass (real Triton kernels): every fold applies (5 LayerNorms, the
    cat and 4 rotations per double + single block pair), and compiled sampling is as far from
    eager as it is when the pass folds nothing (H100: FLUX 1.36e-2 against 1.33e-2,
    HunyuanVideo 1.83e-2 against 1.85e-2; HunyuanVideo's transposed first tokens, read as
    rows, once gave 0.49)."""
    pytest.importorskip("torchao")
    (result,) = run_ranks(folds_against_eager_on_cuda, 1, str(comfyui_path), timeout=600)
    for family in ("flux", "hunyuan_video"):
        folded, plain = result[family, True], result[family, False]
        assert folded["counts"] == {"cat": 1, "layer norm": 5, "rope": 4, "rope pairs": 2}, result
        assert plain["counts"] == {"cat": 0, "layer norm": 0, "rope": 0, "rope pairs": 0}, result
        assert folded["finite"] and plain["finite"]
        assert folded["rel"] < 0.05 and folded["rel"] <= plain["rel"] * 1.25 + 1e-3, result


def test_fp8_checkpoints_keep_their_stored_weights_on_cuda(comfyui_path):
    """fp8_scaled checkpoints through FP8 Quantize on CUDA: tiny Wan 2.1 (ComfyUI computes it in
    fp16: tensor-wise fp8, the layers' own class) and FLUX (bf16: row-wise, fused GELU classes,
    8 and 16 text and image tokens into 12288- and 15360-wide rows: cuBLASLt's small-output
    case). Every block layer's quantized weight is the stored fp8 bytes and scale; eager and
    compiled sampling stay within fp8 activation rounding of ComfyUI's own per-call cast of the
    same weights (H100: 1.2-1.3%; a compiled clone that ran the layers' cast path on the
    quantized weights scaled them twice: 33%); the plain model is ComfyUI's again."""
    pytest.importorskip("torchao")
    (results,) = run_ranks(stored_fp8_on_cuda, 1, str(comfyui_path), timeout=900)
    for family, expected in (("wan", 20), ("flux", 8 + 4)):  # FLUX file: 1 double x 8, 2 single x 2
        result = results[family]
        assert result["layers"] == result["kept"] == expected, results
        assert result["finite"] and result["restored"] and result["comfy_repeats"], results
        to_comfy = result["rel_to_comfy"]
        assert to_comfy["comfy compiled"] < 0.01 and to_comfy["ours"] < 0.05 and to_comfy["ours compiled"] < 0.05, results
        assert result["compiled_vs_eager"] < 0.03, results


def test_a_short_prompt_through_fp8_mlp_outputs_on_cuda(comfyui_path):
    """20 unpadded text tokens through HunyuanVideo-wide fp8 MLP output layers: cuBLASLt refuses
    a row-wise fp8 GEMM with a bias there (CUBLAS_STATUS_NOT_SUPPORTED before the fused classes
    added it after the GEMM); eager and compiled, the output stays within fp8 rounding of bf16."""
    pytest.importorskip("torchao")
    (result,) = run_ranks(short_prompt_fp8_on_cuda, 1, str(comfyui_path), timeout=600)
    assert result["finite"] and result["rel"]["eager"] < 0.05 and result["rel"]["compiled"] < 0.05, result
