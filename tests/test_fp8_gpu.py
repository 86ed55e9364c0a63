"""FP8 Quantize on a CUDA ComfyUI (gpu tier; skipped without CUDA or ComfyUI)."""
import pytest
import torch

from comfy_para_attn.testing.distributed import run_ranks
from comfy_para_attn.testing.fp8_checks import fp8_round_trip_on_cuda

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fp8_load_backs_up_the_host_weights_and_restores_them(comfyui_path):
    pytest.importorskip("torchao")
    (result,) = run_ranks(fp8_round_trip_on_cuda, 1, str(comfyui_path), timeout=600)
    first, again, twin = result["loads"]
    assert first["device"].startswith("cuda")
    # every quantized layer's backup is the host tensor it was loaded from, not a copy
    assert first["held_backups"] == 20 and again["held_backups"] == 20
    # the GELU in front of each fp8 MLP output layer is fused into its activation quantization
    # (tiny Flux: 2 double blocks x 2 MLPs + 2 single blocks), and the plain run restores them
    # 6 GELU sites and 10 norm-fed layers (tiny FLUX: 2 double blocks, 2 single blocks)
    assert first["fused_layers"] == again["fused_layers"] == twin["fused_layers"] == 16, result["loads"]
    assert result["fused_after_restore"] == 0
    assert twin["held_backups"] == 0  # the twin ran plain first: its weights were on the GPU, copied
    assert result["finite"] and 0 < result["fp8_differs"] < 0.1 and result["fp8_repeats"]
    assert result["same_weights"] and result["same_output"]
