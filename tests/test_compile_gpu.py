"""Compile Model's CUDA-graph modes on a CUDA ComfyUI (gpu tier; skipped without CUDA)."""
import pytest
import torch

from comfy_para_attn.testing.compile_checks import compile_row_reductions, cuda_graphs_with_first_block_cache
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


def test_compiled_graphs_load_from_inductor_cache_in_the_next_process(tmp_path, monkeypatch):
    """ComfyUI after a restart: the second process loads Compile Model's graphs from inductor's
    FX graph cache (with multi-kernel reductions on, torch 2.11 / triton 3.6 crashed there)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the spawned ranks inherit it
    (first,) = run_ranks(compile_row_reductions, 1, timeout=300)
    (second,) = run_ranks(compile_row_reductions, 1, timeout=300)
    assert first["cache_hits"] == 0 and second["cache_hits"] >= 1
    for result in (first, second):
        assert torch.isfinite(result["out"]).all() and result["plain"].abs().max() > 0.1
        assert (result["out"] - result["plain"]).abs().max() < 1e-4


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_model_call_graphs_match_compiled_sampling(comfyui_path, fp8):
    """cuda_graph "model call": the same images as the compiled model without graphs, in a
    second run (replayed from the first run's graph), with another prompt (a new modulation
    table read from the same buffer), after a LoRA changed the weights
    (recaptured: the LoRA shows in the output) and under First Block Cache (not graphed)."""
    if fp8:
        pytest.importorskip("torchao")
    from comfy_para_attn.testing.compile_checks import call_graphs_match_compiled

    (result,) = run_ranks(call_graphs_match_compiled, 1, str(comfyui_path), fp8, timeout=600)
    assert result["finite"], result
    for case, diff in result["diff"].items():
        assert result["scale"][case] > 1e-2, result
        assert diff <= 1e-3 * result["scale"][case], (case, result)
    assert result["lora_effect"] > 1e-2 and result["prompt_effect"] > 1e-2, result
    # precomputed modulation rows (one matmul for all steps) against per-step ones: bf16 roundings
    assert result["modulation_table_diff"] <= 2e-2 * result["scale"]["run 1"], result
    # run 1: a normal call, then a capture; run 2 replays all; the LoRA's new weights recapture.
    assert result["captures"] >= 2 and result["replays"] >= 16, result
