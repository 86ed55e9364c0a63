"""ComfyUI sampling with context parallelism on 2 spawned gloo ranks equals plain sampling
(comfyui tier: real ComfyUI model classes and sampling code; tiny random weights, fp32)."""
import pytest

from comfy_para_attn.testing.comfy_cp_checks import sample_both
from comfy_para_attn.testing.distributed import run_ranks

TOL = 2e-4  # fp32; the parallel path sums attention blocks in a different order

CASES = [
    {"name": "euler-cfg1", "cfg": 1.0},
    {"name": "dpmpp2m-cfg3-denoise0.6", "sampler": "dpmpp_2m", "cfg": 3.0, "denoise": 0.6},
    {"name": "uneven-tokens", "tokens": 7, "latent": {"height": 6, "width": 10}},
]


@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "wan"])
@pytest.mark.parametrize("ulysses,ring,cfg", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["ulysses2", "ring2", "cfg2"])
def test_context_parallel_sampling_equals_plain(comfyui_path, family, ulysses, ring, cfg):
    cases = CASES if cfg == 1 else [{"name": "cfg-parallel", "cfg": 3.0}]
    per_rank = run_ranks(sample_both, 2, str(comfyui_path), family, ulysses, ring, cfg, cases)
    for rank, results in enumerate(per_rank):
        for name, (err, scale) in results.items():
            assert scale > 1e-3, "degenerate output"
            assert err < TOL, f"rank {rank} {name}: max abs err {err:.3g}"


@pytest.mark.parametrize("ulysses,ring,cfg", [(2, 2, 1), (2, 1, 2)], ids=["ulysses2xring2", "cfg2xulysses2"])
def test_four_ranks_unified_and_cfg_layouts(comfyui_path, ulysses, ring, cfg):
    """4 gloo ranks: unified ulysses x ring, and cfg parallel x ulysses (FLUX, cfg 3)."""
    cases = [{"name": "four-ranks", "cfg": 3.0, "tokens": 7, "latent": {"height": 6, "width": 10}}]
    per_rank = run_ranks(sample_both, 4, str(comfyui_path), "flux", ulysses, ring, cfg, cases, timeout=600)
    for rank, results in enumerate(per_rank):
        for name, (err, scale) in results.items():
            assert scale > 1e-3, "degenerate output"
            assert err < TOL, f"rank {rank} {name}: max abs err {err:.3g}"


def test_regional_compile_inside_context_parallel_compiles_each_block_class_once(comfyui_path):
    from comfy_para_attn.testing.comfy_cp_checks import compiled_graphs_under_cp

    assert run_ranks(compiled_graphs_under_cp, 2, str(comfyui_path)) == [2, 2]  # double + single block
