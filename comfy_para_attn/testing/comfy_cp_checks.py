"""Rank functions: context-parallel ComfyUI sampling vs plain in-process sampling.

Each spawned rank imports the same ComfyUI, builds the same seeded tiny model, samples
once plainly and once with `install_context_parallel`, and reports the max difference.
"""
from __future__ import annotations

import torch


def sample_both(rank, world_size, comfy_path, family, ulysses, ring, cfg_degree, cases):
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=True)
    torch.set_num_threads(1)
    from comfy_para_attn.adapters.comfy.context_parallel import install_context_parallel
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
    from comfy_para_attn.testing import comfy_models

    cp = build_parallel_context(ContextParallelConfig(ulysses=ulysses, ring=ring, cfg=cfg_degree))
    results = {}
    for case in cases:
        patcher = comfy_models.build(family, seed=0, **case.get("config", {}))
        positive = comfy_models.conditioning(patcher, tokens=case.get("tokens", 8), seed=1)
        negative = comfy_models.conditioning(patcher, tokens=case.get("tokens", 8), seed=2)
        if case.get("cond"):  # e.g. HunyuanVideo image-to-video's guiding_frame_index
            positive, negative = ([[t, {**extra, **case["cond"]}] for t, extra in c] for c in (positive, negative))
        shape = comfy_models.latent_shape(family, **case.get("latent", {}))
        latent = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.5
        kwargs = dict(steps=case.get("steps", 3), cfg=case.get("cfg", 1.0), sampler_name=case.get("sampler", "euler"),
                      denoise=case.get("denoise", 1.0), seed=5)
        if case.get("keep_first_frame"):  # image-to-video: the first latent frame is given, not denoised
            mask = torch.ones((1, 1) + tuple(shape[2:]))
            mask[:, :, 0] = 0.0
            kwargs["noise_mask"] = mask
        plain = comfy_models.sample(patcher, positive, negative, latent, **kwargs)
        if case.get("compile"):  # Compile Model's regional compile (fullgraph blocks) under context parallelism
            from comfy_para_attn.adapters.comfy.compile import apply_compile
            from comfy_para_attn.compile import CompileSettings

            # ComfyUI's CPU attention asks psutil for free memory: a graph break; SDPA as on CUDA
            patcher = comfy_models.use_sdpa_attention(patcher.clone())
            patcher = apply_compile(patcher, CompileSettings(backend=case["compile"], fullgraph=True))
        parallel = comfy_models.sample(install_context_parallel(patcher, cp), positive, negative, latent, **kwargs)
        ok = bool(torch.isfinite(parallel).all()) and parallel.shape == plain.shape
        err = (parallel - plain).abs().max().item() if ok else float("inf")
        results[case["name"]] = (err, plain.abs().mean().item())
    return results


def compiled_graphs_under_cp(rank, world_size, comfy_path):
    """Regional compile inside context parallelism: dynamo graphs made over two prompts
    (different seeds). Expect one per block class: no recompile for the first (sharded) block."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=True)
    torch.set_num_threads(1)
    from torch._dynamo.utils import counters

    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.context_parallel import install_context_parallel
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.testing import comfy_models

    cp = build_parallel_context(ContextParallelConfig(ulysses=world_size))
    patcher = comfy_models.build("flux", seed=0)
    model = install_context_parallel(apply_compile(patcher, CompileSettings(backend="eager")), cp)
    positive = comfy_models.conditioning(patcher, seed=1)
    latent = torch.zeros(comfy_models.latent_shape("flux"))
    counters.clear()
    for seed in (1, 2):
        comfy_models.sample(model, positive, [], latent, steps=2, cfg=1.0, seed=seed)
    return int(counters["stats"]["unique_graphs"])


def ring_call_order_in_compiled_blocks(rank, world_size, comfy_path, family):
    """Rank 0's inductor code for every compiled block class of a tiny ComfyUI model sampled
    with Compile Model (inductor) under a ring of two: per graph that holds the ring's
    transfer, the order in which it issues the transfer, waits for it and launches the
    attention kernels."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=True)
    torch.set_num_threads(1)
    from torch._inductor.utils import run_and_get_code

    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.context_parallel import install_context_parallel
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.attention_checks import RING_ISSUE, ring_call_order

    cp = build_parallel_context(ContextParallelConfig(ring=world_size))
    patcher = comfy_models.build(family, seed=0)
    model = install_context_parallel(apply_compile(patcher, CompileSettings()), cp)
    positive = comfy_models.conditioning(patcher, seed=1)
    latent = torch.randn(comfy_models.latent_shape(family), generator=torch.Generator().manual_seed(3))
    _, codes = run_and_get_code(comfy_models.sample, model, positive, [], latent, steps=1, cfg=1.0, seed=1)
    return [order for order in map(ring_call_order, codes) if RING_ISSUE in order]


def precomputed_modulation_under_cp(rank, world_size, comfy_path, ulysses, cfg):
    """Compile Model's precomputed modulation inside context parallelism (cfg 3): (largest
    difference to in-process sampling with the modulation per step, its scale, calls served
    from a table). With cfg parallelism the split batch is not the one the rows were chosen
    for, so no call may be served."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=True)
    torch.set_num_threads(1)
    from comfy_para_attn.adapters.comfy import modulation_table
    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.context_parallel import install_context_parallel
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.testing import comfy_models

    served, enter = [], modulation_table.ModulationRows.enter

    def counting_enter(self, *args):
        table = enter(self, *args)
        served.append(table is not None)
        return table

    modulation_table.ModulationRows.enter = counting_enter
    cp = build_parallel_context(ContextParallelConfig(ulysses=ulysses, cfg=cfg))
    patcher = comfy_models.build("flux", seed=0)
    positive, negative = comfy_models.conditioning(patcher, seed=1), comfy_models.conditioning(patcher, seed=2)
    latent = torch.zeros(comfy_models.latent_shape("flux"))

    def sample(model):
        return comfy_models.sample(model, positive, negative, latent, steps=3, cfg=3.0, seed=4)

    ref = sample(apply_compile(patcher, CompileSettings(backend="eager", modulation="per step")))
    out = sample(install_context_parallel(apply_compile(patcher, CompileSettings(backend="eager")), cp))
    assert torch.isfinite(out).all()
    return float((out - ref).abs().max()), float(ref.abs().mean()), sum(served)


def agree_on_memory(rank, world_size, comfy_path, layout, jobs):
    """The batching answers of `AgreedMemoryEstimate` for `layout` ({"ulysses": 2} or {"cfg": 2}),
    one estimate object per job as the workers build them; each job is (free bytes by rank, the
    batched input's shape) with a latent batch of 1, so the shape's first size is the number of
    chunks (conds) in the call. ComfyUI's whole-call estimate is 1.6e9 bytes. A stand-in gives
    each rank its free memory: CPU ranks have none."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=True)
    import comfy.model_management

    from comfy_para_attn.adapters.comfy.agreed_memory import AgreedMemoryEstimate, AgreeWhileBatching
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context

    cp = build_parallel_context(ContextParallelConfig(**layout))
    x_in = torch.zeros(1, 16, 8, 8)
    answers = []
    for free, shape in jobs:
        comfy.model_management.get_free_memory = lambda *args, **kwargs: free[rank]
        estimate = AgreedMemoryEstimate(lambda input_shape, cond_shapes={}: 1.6e9, cp)
        batching = AgreeWhileBatching(estimate)(
            lambda model, conds, x, timestep, options: [estimate(shape), estimate(shape)], None, [], x_in, None, {})
        answers.append((estimate(shape), *batching))
    return answers
