"""Diffusers tier: context-parallel Flux / HunyuanVideo transformers equal the plain model.

Tiny random-weight models in fp32 on spawned gloo ranks (one spawn per world size, every
check of that world inside it). Each rank compares its gathered full output with the plain
model's: max abs error / max abs output < RELATIVE_TOLERANCE (1e-4; observed ~3e-7), and
finite. Cases cover uneven splits of both streams and HunyuanVideo with padded text (one
prompt of the batch has 3 masked tokens).
"""
import pytest
import torch

pytest.importorskip("diffusers")

from comfy_para_attn.adapters.diffusers import parallelize_transformer  # noqa: E402
from comfy_para_attn.attention import ContextParallelConfig  # noqa: E402
from comfy_para_attn.testing.diffusers_cp_checks import RELATIVE_TOLERANCE, check_parallel_models  # noqa: E402
from comfy_para_attn.testing.distributed import run_ranks  # noqa: E402

CASES = ("flux-even", "flux-uneven", "hunyuan-padded-uneven")


def _failures(per_rank):
    return [
        f"rank {rank} {key}: relative error {err:.3g} >= {RELATIVE_TOLERANCE}"
        for rank, errors in enumerate(per_rank)
        for key, err in errors.items()
        if not err < RELATIVE_TOLERANCE  # inf (shape mismatch or non-finite) fails too
    ]


def test_world2_ulysses_and_ring_match_plain_model():
    # Compiled (fullgraph, aot_eager) once per model family: routing must not break the graph.
    compiled = ("u2r1/flux-uneven", "u1r2/hunyuan-padded-uneven")
    per_rank = run_ranks(check_parallel_models, 2, [(2, 1), (1, 2)], compiled)
    expected = {f"{layout}/{case}{suffix}" for layout in ("u2r1", "u1r2") for case in CASES for suffix in ("", "/undo")}
    assert set(per_rank[0]) == expected | {f"{key}/compiled" for key in compiled}
    assert not _failures(per_rank), "\n".join(_failures(per_rank))


def test_world4_ulysses2_ring2_matches_plain_model():
    per_rank = run_ranks(check_parallel_models, 4, [(2, 2)])
    assert len(per_rank[0]) == 2 * len(CASES)
    assert not _failures(per_rank), "\n".join(_failures(per_rank))


def test_a_processor_replaced_after_parallelizing_is_refused():
    from comfy_para_attn.testing.diffusers_cp_checks import check_replaced_processor_is_refused

    for message, error in run_ranks(check_replaced_processor_is_refused, 2):
        assert "was replaced after parallelize_transformer" in message
        assert error < RELATIVE_TOLERANCE


def test_unsupported_model_names_the_supported_ones():
    with pytest.raises(TypeError, match="FluxTransformer2DModel and HunyuanVideoTransformer3DModel.*Linear"):
        parallelize_transformer(torch.nn.Linear(2, 2), ContextParallelConfig(ulysses=2))


def test_token_replace_hunyuan_is_rejected():
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6), image_condition_type="token_replace",
    )
    with pytest.raises(NotImplementedError, match="token_replace"):
        parallelize_transformer(model, ContextParallelConfig(ulysses=2))


def test_first_block_cache_decides_on_the_summed_diffs_of_both_ranks():
    from comfy_para_attn.testing.diffusers_cp_checks import check_cache_under_context_parallel

    ranks = run_ranks(check_cache_under_context_parallel, 2, timeout=120)
    plain_history, plain_out = ranks[0][0], ranks[0][1]
    assert 0 < sum(plain_history) < len(plain_history), plain_history  # some reuse, not all
    assert torch.isfinite(plain_out).all() and plain_out.abs().mean() > 0.1
    for _, _, history, out in ranks:
        assert history == plain_history
        torch.testing.assert_close(out, plain_out, atol=1e-4, rtol=1e-4)
