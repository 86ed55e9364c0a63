"""Compile Model's CUDA-graph modes on a CUDA ComfyUI (gpu tier; skipped without CUDA)."""
import pytest
import torch

from comfy_para_attn.testing.compile_checks import cuda_graphs_with_first_block_cache
from comfy_para_attn.testing.distributed import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_reduce_overhead_replays_cuda_graphs_under_first_block_cache(comfyui_path):
    """ComfyUI's blocks add their residual in place, which keeps inductor from CUDA graphs
    unless the inputs are copied inside the graph; First Block Cache keeps only tensors it
    computed itself, so replays that overwrite the blocks' outputs cannot reach it."""
    (result,) = run_ranks(cuda_graphs_with_first_block_cache, 1, str(comfyui_path), timeout=600)
    assert result["cudagraph_skips"] == 0
    assert len(result["reuse"]) == 4 and all("reused 0 of" not in line for line in result["reuse"]), result["reuse"]
    assert result["finite"] and result["scale"] > 1e-3
    assert result["max_diff"] < 0.05 * result["scale"] + 1e-2, result
