"""Conds moved to the model's device once per sampling run (comfyui tier; the copy count on
CUDA is gpu tier)."""
import pytest
import torch

from comfy_para_attn.testing.distributed import run_ranks


@pytest.fixture
def flux_run(cm):
    """A tiny Flux and this run's encoded conds (positive and negative), as ComfyUI's
    `process_conds` leaves them for the sampler."""
    import comfy.model_patcher
    import comfy.sampler_helpers
    import comfy.samplers

    built = cm.build("flux", seed=0, **cm.flux_config("tiny"))
    patcher = comfy.model_patcher.ModelPatcher(built.model, torch.device("cpu"), torch.device("cpu"))
    conds = {"positive": comfy.sampler_helpers.convert_cond(cm.conditioning(patcher, seed=1)),
             "negative": comfy.sampler_helpers.convert_cond(cm.conditioning(patcher, seed=2))}
    noise = torch.randn(cm.latent_shape("flux"), generator=torch.Generator().manual_seed(0))
    encoded = comfy.samplers.process_conds(patcher.model, noise, conds, torch.device("cpu"))
    return patcher, encoded


def test_every_model_cond_tensor_moves_and_the_originals_stay(flux_run):
    from comfy_para_attn.adapters.comfy.device_conds import conds_on_device

    _, encoded = flux_run
    before = {k: [dict(c["model_conds"]) for c in v] for k, v in encoded.items()}
    moved = conds_on_device(encoded, "meta")  # a second device on a CPU-only machine
    names = set()
    for kind, items in moved.items():
        for new, old in zip(items, before[kind]):
            for name, value in new["model_conds"].items():
                names.add(name)
                assert value.cond.device.type == "meta", name
                assert value.cond.shape == old[name].cond.shape and value.cond.dtype == old[name].cond.dtype
                assert type(value) is type(old[name])
    assert {"c_crossattn", "guidance", "y"} <= names  # FLUX: text tokens, guidance, pooled vector
    for kind, items in encoded.items():  # the run's own conds (and the graph's) are untouched
        for cond, old in zip(items, before[kind]):
            assert cond["model_conds"] == old
            assert all(v.cond.device.type == "cpu" for v in cond["model_conds"].values())


def test_each_node_installs_it_once(flux_run):
    import comfy.patcher_extension

    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.device_conds import WRAPPER_KEY
    from comfy_para_attn.adapters.comfy.first_block_cache import apply_first_block_cache
    from comfy_para_attn.cache import FirstBlockCacheSettings
    from comfy_para_attn.compile import CompileSettings

    patcher, _ = flux_run
    model = apply_compile(apply_first_block_cache(patcher, FirstBlockCacheSettings()), CompileSettings(scope="off"))
    wrappers = model.get_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)
    assert len(wrappers) == 1
    assert not patcher.get_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY)


def test_sampling_sees_the_moved_conds(flux_run, cm):
    """The wrapper runs inside ComfyUI's sampling and hands the sampler the moved conds. The
    load device here is the CPU, so no tensor moves; the cond dicts are new ones, which tells
    a wrapper outside ours from one inside."""
    import comfy.patcher_extension

    from comfy_para_attn.adapters.comfy.device_conds import keep_conds_on_device

    patcher, _ = flux_run
    model = patcher.clone()
    seen = {}

    def look(where):
        def wrapper(executor, guider, *args, **kwargs):
            seen[where] = {k: [id(c) for c in v] for k, v in guider.conds.items()}
            return executor(guider, *args, **kwargs)
        return wrapper

    sampler_sample = comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE
    model.add_wrapper_with_key(sampler_sample, "test_outside", look("outside"))  # first added: outermost
    keep_conds_on_device(model)
    model.add_wrapper_with_key(sampler_sample, "test_inside", look("inside"))
    positive, negative = cm.conditioning(model, seed=1), cm.conditioning(model, seed=2)
    latent = torch.randn(cm.latent_shape("flux"), generator=torch.Generator().manual_seed(3))
    out = cm.sample(model, positive, negative, latent, steps=2, cfg=2.0)
    reference = cm.sample(patcher, positive, negative, latent, steps=2, cfg=2.0)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert torch.equal(out, reference)
    assert set(seen["inside"]) == set(seen["outside"]) == {"positive", "negative"}
    for kind in seen["inside"]:
        assert not set(seen["inside"][kind]) & set(seen["outside"][kind])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_pageable_copy_per_step_on_cuda(comfyui_path):
    from comfy_para_attn.testing.device_conds_checks import pageable_copies_per_run

    (result,) = run_ranks(pageable_copies_per_run, 1, str(comfyui_path), timeout=600)
    assert result["finite"] and result["scale"] > 1e-3 and result["same_output"], result
    assert result["plain_6"] > result["plain_2"], result  # ComfyUI copies the conds in every model call
    # once per run (moving them), none per step
    assert result["resident_6"] == result["resident_2"] and result["resident_6"] < result["plain_6"], result
