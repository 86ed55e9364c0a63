"""Compile Model's CUDA-graph modes on a CUDA ComfyUI (gpu tier): run in a spawned process,
since the comfyui tier's own process imports ComfyUI with `--cpu`."""
from __future__ import annotations

import logging

import torch


def cuda_graphs_with_first_block_cache(rank, world_size, comfy_path):
    """A tiny Flux on the GPU, First Block Cache (reusing steps) over Compile Model: mode
    "default" against "reduce-overhead" (CUDA graphs), two resolutions. Returns the largest
    difference, the cache's reuse count, and inductor's count of skipped CUDA graphs."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=False)
    import comfy.model_management
    from torch._dynamo.utils import counters

    from comfy_para_attn.adapters.comfy import features
    from comfy_para_attn.cache.state import FirstBlockCacheSettings
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.testing import comfy_models as cm

    reuse = []

    class Reuse(logging.Handler):
        def emit(self, record):
            if "reused" in record.getMessage():
                reuse.append(record.getMessage())

    logging.getLogger().addHandler(Reuse(logging.INFO))
    logging.getLogger().setLevel(logging.INFO)
    device = comfy.model_management.get_torch_device()
    base = cm.build("flux", dtype=torch.bfloat16, device=device, seed=0)
    positive = cm.conditioning(base, seed=1, device=device)
    cache = FirstBlockCacheSettings(residual_diff_threshold=1.0)  # random weights: reuse most steps
    outputs = {}
    for mode in ("default", "reduce-overhead"):
        model = features.apply("first_block_cache", features.apply("compile", base, CompileSettings(mode=mode)), cache)
        for side in (8, 12):
            latent = torch.randn(cm.latent_shape("flux", height=side, width=side),
                                 generator=torch.Generator().manual_seed(side))
            outputs[mode, side] = cm.sample(model, positive, [], latent, steps=6, cfg=1.0, seed=0).float()
        comfy.model_management.unload_all_models()
    diff = max(float((outputs["default", s] - outputs["reduce-overhead", s]).abs().max()) for s in (8, 12))
    scale = min(float(outputs["default", s].abs().mean()) for s in (8, 12))
    finite = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    return {"max_diff": diff, "scale": scale, "finite": finite, "reuse": reuse,
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def compile_row_reductions(rank, world_size, device="cuda"):
    """Compile Model's inductor options on LayerNorm + row max over 3072 values (the rows
    multi-kernel reductions target), in a fresh process: returns the output and inductor's
    FX graph cache hits (a second process with the same TORCHINDUCTOR_CACHE_DIR loads it)."""
    import torch.nn.functional as F
    from torch._dynamo.utils import counters

    from comfy_para_attn.compile import CompileSettings

    import torch._inductor.config

    torch._inductor.config.fx_graph_cache = True

    def rows(x):
        y = F.layer_norm(x, (x.shape[-1],))
        return y * y.abs().amax(-1, keepdim=True).reciprocal()

    x = torch.randn(512, 3072, device=device, generator=torch.Generator(device).manual_seed(0))
    out = torch.compile(rows, **CompileSettings().compile_kwargs())(x)
    return {"out": out.cpu(), "plain": rows(x).cpu(), "cache_hits": counters["inductor"]["fxgraph_cache_hit"]}


def call_graphs_match_compiled(rank, world_size, comfy_path, fp8=False):
    """A tiny Flux on the GPU through Compile Model with and without cuda_graph "model call",
    cfg 2 (cond and uncond in one call): two runs, a run with another prompt (a new modulation
    table in the buffer the graph reads), a LoRA applied after the graphs were captured, and
    First Block Cache on top (its calls stay ungraphed); and the compiled model with the
    modulation computed per step. Returns each case's
    largest difference and scale, and the graphs' capture / replay counts."""
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=False)
    import comfy.model_management
    import comfy.patcher_extension

    from comfy_para_attn.adapters.comfy import features
    from comfy_para_attn.adapters.comfy.compile import WRAPPER_KEY
    from comfy_para_attn.cache.state import FirstBlockCacheSettings
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.testing import comfy_models as cm

    device = comfy.model_management.get_torch_device()
    base = cm.build("flux", dtype=torch.bfloat16, device=device, seed=0)
    if fp8:
        from comfy_para_attn.quant import FP8Settings

        base = features.apply("fp8", base, FP8Settings())
    positive = cm.conditioning(base, seed=1, device=device)
    negative = cm.conditioning(base, seed=2, device=device)
    latent = torch.randn(cm.latent_shape("flux", height=16, width=16), generator=torch.Generator().manual_seed(5))
    lora = cm.random_lora(base, max_layers=6)
    cache = FirstBlockCacheSettings(residual_diff_threshold=0.5)

    def graphs_of(model):
        (wrapper,) = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        return wrapper.call_graphs.graphs

    def sample(model, prompt=positive):
        return cm.sample(model, prompt, negative, latent, steps=6, cfg=2.0, seed=0).float()

    outputs, counts = {}, {}
    other_prompt = cm.conditioning(base, seed=3, device=device)
    per_step = features.apply("compile", base, CompileSettings(modulation="per step"))
    outputs["per step", "run 1"] = sample(per_step)
    comfy.model_management.unload_all_models()
    for name, graph in (("compiled", "off"), ("graphed", "model call")):
        model = features.apply("compile", base, CompileSettings(cuda_graph=graph))
        outputs[name, "run 1"] = sample(model)
        outputs[name, "run 2"] = sample(model)
        outputs[name, "prompt"] = sample(model, other_prompt)  # a new modulation table, same buffer
        with_lora = cm.apply_lora(model, lora, strength=0.8)
        outputs[name, "lora"] = sample(with_lora)
        outputs[name, "cache"] = sample(features.apply("first_block_cache", model, cache))
        if graph != "off":
            counts = {"captures": graphs_of(model).captures, "replays": graphs_of(model).replays}
        comfy.model_management.unload_all_models()
    cases = ("run 1", "run 2", "prompt", "lora", "cache")
    return {"diff": {c: float((outputs["graphed", c] - outputs["compiled", c]).abs().max()) for c in cases},
            "modulation_table_diff": float((outputs["compiled", "run 1"] - outputs["per step", "run 1"]).abs().max()),
            "prompt_effect": float((outputs["compiled", "prompt"] - outputs["compiled", "run 1"]).abs().max()),
            "scale": {c: float(outputs["compiled", c].abs().mean()) for c in cases},
            "lora_effect": float((outputs["compiled", "lora"] - outputs["compiled", "run 1"]).abs().max()),
            "finite": all(bool(torch.isfinite(o).all()) for o in outputs.values()), **counts}
