"""Rank functions for the diffusers context-parallel tests (run by `run_ranks`).

Every rank builds the same tiny model and inputs from a seed, runs the plain model as the
reference, then the parallelized model on the same full inputs, and reports the max abs
error relative to the reference's scale (each rank gets the full output after the gather).
"""
from __future__ import annotations

import torch

from comfy_para_attn.adapters.diffusers.context_parallel import parallelize_transformer, unparallelize_transformer
from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
from comfy_para_attn.testing.diffusers_models import flux_inputs, hunyuan_video_inputs, tiny_flux, tiny_hunyuan_video

RELATIVE_TOLERANCE = 1e-4  # max abs error / max abs reference output, fp32


def _cases():
    """(name, model builder, inputs). Image/text lengths are chosen so that at world 2 and 4
    some streams split unevenly."""
    padded = hunyuan_video_inputs(batch=2, frames=3, height=3, width=3, tokens=9, seed=3)
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[0, 6:] = False  # prompt 0 has 6 real tokens, prompt 1 all 9
    padded["encoder_attention_mask"] = keep
    return [
        ("flux-even", lambda: tiny_flux(heads=4, seed=1), flux_inputs(height=4, width=4, tokens=8, seed=1)),
        ("flux-uneven", lambda: tiny_flux(heads=4, seed=2), flux_inputs(batch=2, height=3, width=5, tokens=7, seed=2)),
        ("hunyuan-padded-uneven", lambda: tiny_hunyuan_video(heads=4, seed=3), padded),
    ]


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _compile_blocks(model) -> None:
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.compile(backend="aot_eager", fullgraph=True, dynamic=False)


def check_parallel_models(rank, world_size, layouts, compiled_cases=()):
    """For each (ulysses, ring) layout and case: {"u{U}r{R}/case": relative error}, plus
    ".../undo" (parallelize then undo equals the plain model) and, for the keys named in
    `compiled_cases`, ".../compiled" (blocks compiled with fullgraph=True: no graph breaks)."""
    results = {}
    timestep = torch.tensor([0.6])
    for ulysses, ring in layouts:
        cp = build_parallel_context(ContextParallelConfig(ulysses=ulysses, ring=ring), num_heads=4)
        for name, build, inputs in _cases():
            key = f"u{ulysses}r{ring}/{name}"
            model = build()
            call = dict(inputs, timestep=timestep.expand(inputs["hidden_states"].shape[0]), return_dict=False)
            with torch.no_grad():
                ref = model(**call)[0]
                parallelize_transformer(model, cp)
                results[key] = _relative_error(model(**call)[0], ref)
                if key in compiled_cases:
                    _compile_blocks(model)
                    results[f"{key}/compiled"] = _relative_error(model(**call)[0], ref)
                    torch._dynamo.reset()
                unparallelize_transformer(model)
                results[f"{key}/undo"] = _relative_error(model(**call)[0], ref)
    return results


def check_replaced_processor_is_refused(rank, world_size):
    """A processor set after parallelize_transformer (set_attn_processor) would attend over this
    rank's shard only: the next call raises; unparallelize, set, parallelize again equals the
    plain model. Returns (error message, relative error after parallelizing again)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    cp = build_parallel_context(ContextParallelConfig(ring=world_size), num_heads=4)
    name, build, inputs = _cases()[0]
    model = build()
    call = dict(inputs, timestep=torch.tensor([0.6]).expand(inputs["hidden_states"].shape[0]), return_dict=False)
    with torch.no_grad():
        ref = model(**call)[0]
        parallelize_transformer(model, cp)
        model.set_attn_processor(FluxAttnProcessor())
        try:
            model(**call)
            message = ""
        except RuntimeError as exc:
            message = str(exc)
        unparallelize_transformer(model)
        model.set_attn_processor(FluxAttnProcessor())
        parallelize_transformer(model, cp)
        return message, _relative_error(model(**call)[0], ref)


def check_cache_under_context_parallel(rank, world_size, threshold=0.3):
    """First Block Cache on a parallelized tiny Flux, its diffs summed over the ranks
    (`ParallelContext.all_reduce_sum`): (history, output) of this rank and of the plain cached
    model in one process. The summed diffs are the whole latent's, so the decisions must be
    the single process's (without the sum the ranks could take different branches: a hang)."""
    from comfy_para_attn.adapters.diffusers.cache import apply_cache, remove_cache
    from comfy_para_attn.testing.diffusers_models import denoise

    schedule = torch.linspace(1.0, 0.1, 8)
    inputs = flux_inputs(height=4, width=6, tokens=8, seed=5)
    model = tiny_flux(heads=4, seed=5)
    plain = apply_cache(model, threshold)
    plain_out = denoise(model, inputs, schedule)
    remove_cache(model)
    cp = build_parallel_context(ContextParallelConfig(ulysses=world_size), num_heads=4)
    parallelize_transformer(model, cp)
    run = apply_cache(model, threshold, reduce_sum=cp.all_reduce_sum)
    out = denoise(model, inputs, schedule)
    remove_cache(model)
    return list(plain.cache.history), plain_out, list(run.cache.history), out
