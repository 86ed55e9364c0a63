"""What other nodes add to a model reaches the Context Parallel workers (comfyui tier, 2 CPU
ranks): ComfyUI's samplers, guidance nodes' closures, wrappers, dtypes and settings."""


import pytest
import torch

from comfy_para_attn.testing.comfy_pool_checks import POOL_TOL, context_parallel, comfy_extras_module


def test_every_sampler_comfyui_ships_can_reach_the_workers(comfyui_path):
    """KSampler's whole list: each sampler object pickles or travels as a recipe (dpm_fast and
    dpm_adaptive are functions local to comfy.samplers.ksampler) that rebuilds to the same
    function with the same options."""
    import pickle

    import comfy.samplers

    from comfy_para_attn.adapters.comfy.portable import portable_sampler, rebuild_sampler

    recipes = 0
    for name in comfy.samplers.KSampler.SAMPLERS:
        sampler = comfy.samplers.sampler_object(name)
        sent = portable_sampler(sampler)
        rebuilt = rebuild_sampler(pickle.loads(pickle.dumps(sent)))
        recipes += sent is not sampler
        assert type(rebuilt) is type(sampler), name
        function = getattr(sampler, "sampler_function", None)
        if function is not None:
            assert rebuilt.sampler_function.__qualname__ == function.__qualname__, name
            assert rebuilt.extra_options == sampler.extra_options, name
            assert rebuilt.inpaint_options == sampler.inpaint_options, name
    assert recipes == 2  # dpm_fast, dpm_adaptive


def test_a_sampler_from_a_module_named_by_its_path_reaches_the_workers(comfyui_path, pack_nodes, pool_cleanup):
    """ComfyUI loads comfy_extras (and custom node packs) under their file path as module
    name: SamplerEulerCFG++'s function travels by file, and the pool samples as in-process
    (plain pickle named a module the workers could not import, and the failure ended the pool)."""
    import importlib.util
    import os
    import sys

    import comfy.sample
    import comfy.samplers

    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    path = os.path.join(comfyui_path, "comfy_extras", "nodes_advanced_samplers.py")
    name = os.path.splitext(path)[0]  # as ComfyUI's load_custom_node names it
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    sampler = comfy.samplers.KSAMPLER(module.sample_euler_pp)
    patcher, pos, neg, latent = sampling_inputs("flux")

    def run(model):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(2.0)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
        return guider.sample(comfy.sample.prepare_noise(latent, 0), latent, sampler, sigmas, seed=0,
                             disable_pbar=True)

    in_process = run(patcher)
    parallel = run(context_parallel(pack_nodes, patcher))
    assert torch.isfinite(parallel).all() and in_process.abs().mean() > 1e-3
    assert (parallel - in_process).abs().max().item() < POOL_TOL
    assert current_pool() is not None


_GUIDANCE_NODES = {  # node: (module, class, inputs besides the model)
    "CFGZeroStar": ("nodes_cfg", "CFGZeroStar", {}),
    "RescaleCFG": ("nodes_model_advanced", "RescaleCFG", dict(multiplier=0.7)),
    "APG": ("nodes_apg", "APG", dict(eta=1.0, norm_threshold=5.0, momentum=-0.5)),
    "TCFG": ("nodes_tcfg", "TCFG", {}),
    "Mahiro": ("nodes_mahiro", "Mahiro", {}),
    "SkipLayerGuidanceDiT": ("nodes_slg", "SkipLayerGuidanceDiT",
                             dict(scale=3.0, start_percent=0.0, end_percent=1.0, double_layers="1", single_layers="")),
}


@pytest.mark.parametrize("node", sorted(_GUIDANCE_NODES))
def test_guidance_nodes_closures_sample_in_the_pool_as_in_process(comfyui_path, pack_nodes, pool_cleanup, node):
    """ComfyUI's guidance nodes (CFG-Zero*, RescaleCFG, APG, TCFG, Mahiro, Skip Layer Guidance)
    put closures in the model options, which no name reaches: they travel by value and the
    pool samples a Wan graph with them as in-process (ring x2, cfg 3); before, every one of
    them was refused."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    module, cls_name, inputs = _GUIDANCE_NODES[node]
    cls = getattr(comfy_extras_module(comfyui_path, module), cls_name)
    patcher, pos, neg, latent = sampling_inputs("wan")
    out = cls.execute(patcher, **inputs) if hasattr(cls, "execute") else getattr(cls(), cls.FUNCTION)(patcher, **inputs)
    patched = out.result[0] if hasattr(out, "result") else out[0]
    assert patched.model_options != patcher.model_options
    without = comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=3.0)
    plain = comfy_models.sample(patched, pos, neg, latent, steps=3, cfg=3.0)
    assert (plain - without).abs().max() > 1e-3  # the node changes the result
    parallel = comfy_models.sample(context_parallel(pack_nodes, patched, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                                   steps=3, cfg=3.0)
    assert torch.isfinite(parallel).all()
    err = (parallel - plain).abs().max().item()
    assert err < POOL_TOL, f"{node}: max abs err {err:.3g}"


@pytest.mark.parametrize("family, layers", [("wan", dict(double_layers="0,2")), ("flux", dict(single_layers="1"))])
def test_skip_layer_guidance_on_the_first_or_last_block(comfyui_path, pack_nodes, pool_cleanup, family, layers):
    """Skip Layer Guidance replaces the blocks it skips in its extra model call's options: on
    the first or last block that removed the patch that shards or gathers the tokens (a
    shape error in the workers); ours are put back around its skip for that call."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    slg = comfy_extras_module(comfyui_path, "nodes_slg").SkipLayerGuidanceDiT
    patcher, pos, neg, latent = sampling_inputs(family)
    inputs = {**dict(scale=3.0, start_percent=0.0, end_percent=1.0, double_layers="", single_layers=""), **layers}
    skipping = slg.execute(patcher, **inputs).result[0]
    plain = comfy_models.sample(skipping, pos, neg, latent, steps=3, cfg=3.0)
    assert (plain - comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=3.0)).abs().max() > 1e-3
    for layout in (dict(ulysses_degree=2), dict(ulysses_degree=1, ring_degree=2)):
        out = comfy_models.sample(context_parallel(pack_nodes, skipping, **layout), pos, neg, latent, steps=3, cfg=3.0)
        err = (out - plain).abs().max().item()
        assert torch.isfinite(out).all() and err < POOL_TOL, f"{layout}: max abs err {err:.3g}"


def test_a_wrapper_added_without_a_key_reaches_the_workers(comfyui_path, pack_nodes, pool_cleanup):
    """`ModelPatcher.add_wrapper` files a wrapper under the key None (ComfyUI's CFGOverride
    does): the payload's wrapper filter took every key for a string and failed the job."""
    import comfy.patcher_extension

    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import APPLY_MODEL_CALLS, counting_apply_model, sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("wan")
    wrapped = patcher.clone()
    wrapped.add_wrapper(comfy.patcher_extension.WrappersMP.APPLY_MODEL, counting_apply_model)
    APPLY_MODEL_CALLS.clear()
    plain = comfy_models.sample(wrapped, pos, neg, latent, steps=2, cfg=3.0)
    assert APPLY_MODEL_CALLS  # the wrapper runs in-process
    out = comfy_models.sample(context_parallel(pack_nodes, wrapped, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                              steps=2, cfg=3.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < POOL_TOL


def test_model_compute_dtype_reaches_the_workers(comfyui_path, pack_nodes, pool_cleanup):
    """ComfyUI's ModelComputeDtype (fp32 compute on bf16 weights) sets force_cast_weights on
    the patcher: the workers cast as in-process sampling does (without it, a dtype mismatch
    failed the run and ended the pool)."""
    from comfy_extras.nodes_model_advanced import ModelComputeDtype

    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    _, pos, neg, latent = sampling_inputs("flux")
    model = ModelComputeDtype().patch(comfy_models.build("flux", dtype=torch.bfloat16, seed=0), "fp32")[0]
    assert model.force_cast_weights
    in_process = comfy_models.sample(model, pos, neg, latent, steps=2, cfg=3.0)
    parallel = comfy_models.sample(context_parallel(pack_nodes, model), pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(parallel).all() and in_process.abs().mean() > 1e-3
    assert (parallel - in_process).abs().max().item() < POOL_TOL


def test_enum_settings_such_as_fast_reach_the_workers(comfyui_path, pool_cleanup):
    """ComfyUI's `--fast` (a set of PerformanceFeature) was dropped from the settings the
    workers get (not JSON): it changed in-process sampling (fp16 accumulation, fp8 matmuls,
    cuBLAS ops) but not the pool's. The preview method, which newer ComfyUI sets from each
    prompt and the workers never read, does not make a new pool."""
    import comfy.cli_args

    from comfy_para_attn.adapters.comfy.comfy_pool import comfy_pool
    from comfy_para_attn.pool import shutdown_pool

    args = comfy.cli_args.args
    fast, preview = args.fast, args.preview_method
    chosen = {list(comfy.cli_args.PerformanceFeature)[0], list(comfy.cli_args.PerformanceFeature)[-1]}
    shutdown_pool()  # a pool starts with the settings of its start
    try:
        args.fast = chosen
        pool = comfy_pool(2, "cpu")
        seen_fast = pool.run("comfy_para_attn.testing.pool_jobs:comfy_cli_setting", "fast", timeout_s=60)
        pids = pool.pids
        for method in (comfy.cli_args.LatentPreviewMethod.Latent2RGB, comfy.cli_args.LatentPreviewMethod.NoPreviews):
            args.preview_method = method  # what newer ComfyUI's set_preview_method does per prompt
            assert comfy_pool(2, "cpu") is pool and pool.pids == pids
    finally:
        args.fast, args.preview_method = fast, preview
        shutdown_pool()
    assert sorted(seen_fast["values"]) == sorted(m.value for m in chosen)
