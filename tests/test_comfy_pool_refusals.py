"""The Context Parallel node's layouts and refusals in real ComfyUI (comfyui tier): what it
chooses and says, and what it refuses before any worker runs, with what to change."""

import logging

import pytest
import torch

from comfy_para_attn.testing.comfy_pool_checks import POOL_TOL, context_parallel, comfy_extras_module


def test_bad_layouts_are_rejected_before_sampling(comfyui_path, pack_nodes):
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, *_ = sampling_inputs("flux")
    # In the node's own input names, with the ways out.
    with pytest.raises(ValueError, match=r"ulysses_degree 2 x ring_degree 2 = 4, but there are 2 CPU ranks\. "
                                         r"Make the product 2, set gpus to 4, or set layout to auto"):
        context_parallel(pack_nodes, patcher, ulysses_degree=2, ring_degree=2)
    with pytest.raises(ValueError, match=r"x 2 \(cfg_parallel\) = 4, but there are 2 CPU ranks \(gpus 0: all visible\)"):
        context_parallel(pack_nodes, patcher, gpus=0, ulysses_degree=2, cfg_parallel=True)
    with pytest.raises(ValueError, match="does not divide the model's 4.*layout auto picks a valid one"):
        context_parallel(pack_nodes, patcher, gpus=3, ulysses_degree=3)
    with pytest.raises(ValueError, match=r"gpus=4096 CPU ranks .*each rank holds the whole model.*Set gpus to at most"):
        context_parallel(pack_nodes, patcher, gpus=4096, ulysses_degree=4096)


def test_layout_choices_that_change_the_run_are_said(comfyui_path, pack_nodes, caplog):
    """auto with cfg_parallel on an odd rank count runs without it: a warning, not silence."""
    import logging

    from comfy_para_attn.adapters.comfy.pool_sampling import make_settings
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, *_ = sampling_inputs("flux")
    with caplog.at_level(logging.INFO):
        settings = make_settings(patcher, 3, 1, 1, True, 60.0, auto=True)
    assert settings.cfg == 1 and settings.gpus == 3
    assert any(r.levelno == logging.WARNING and "cfg_parallel is off" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert make_settings(patcher, 2, 1, 1, True, 60.0, auto=True).cfg == 2
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)


def test_attention_backend_from_the_model_or_the_node(comfyui_path, pack_nodes):
    """'from model' (the default) takes an Attention Backend node's choice before Context
    Parallel, else sdpa; an explicit choice on Context Parallel wins."""
    from comfy_para_attn.adapters.comfy.pool_sampling import FEATURE
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    def chosen(model):
        return model.model_options["transformer_options"]["para_attn"][FEATURE].attention_backend

    patcher, *_ = sampling_inputs("flux")
    with_triton = pack_nodes["ParaAttnAttentionBackend"]().apply(patcher, "triton")[0]
    assert chosen(context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)) == "sdpa"
    assert chosen(context_parallel(pack_nodes, with_triton, ulysses_degree=1, ring_degree=2)) == "triton"
    assert chosen(context_parallel(pack_nodes, with_triton, ulysses_degree=1, ring_degree=2, attention_backend="sdpa")) == "sdpa"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2, attention_backend="flash")


def test_one_gpu_samples_in_this_process(comfyui_path, pack_nodes):
    """gpus 1: no worker pool (it would only add the weights' transfer); the model samples as
    it is, with the node's attention backend if it names one."""
    from comfy_para_attn.adapters.comfy.attention_backend import BackendAttention
    from comfy_para_attn.adapters.comfy.pool_sampling import FEATURE
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    same = context_parallel(pack_nodes, patcher, gpus=1, ulysses_degree=1)
    assert same is patcher
    routed = context_parallel(pack_nodes, patcher, gpus=1, ulysses_degree=1, attention_backend="triton")
    to = routed.model_options["transformer_options"]
    assert isinstance(to["optimized_attention_override"], BackendAttention) and FEATURE not in to["para_attn"]
    assert to["optimized_attention_override"].backend == "triton"
    running_before = current_pool()
    out = comfy_models.sample(same, pos, neg, latent, steps=2, cfg=1.0)
    assert torch.isfinite(out).all() and current_pool() is running_before


@pytest.mark.parametrize("where", ["windows", "mps"])
def test_machines_without_a_pool_run_gpus_0_here_and_refuse_more(comfyui_path, pack_nodes, monkeypatch, where):
    """Windows (no pass_fds, no NCCL) or ComfyUI on Apple MPS: gpus 0 samples and decodes in
    this process, as gpus 1 does; gpus 2 is an error that says what to set, before any pool."""
    import comfy.model_management

    from comfy_para_attn.adapters.comfy import comfy_pool
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    if where == "windows":
        monkeypatch.setattr(comfy_pool, "ON_WINDOWS", True)
    else:
        monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("mps"))
    expected = "Windows" if where == "windows" else "ComfyUI's mps device"
    assert comfy_pool.pool_unsupported() == expected
    patcher, *_ = sampling_inputs("flux")
    running_before = current_pool()
    assert context_parallel(pack_nodes, patcher, gpus=0, ulysses_degree=1) is patcher
    with pytest.raises(ValueError, match=f"gpus=2, but {expected} cannot run the worker pool.*Set gpus to 0 or 1"):
        context_parallel(pack_nodes, patcher, gpus=2, ulysses_degree=1)
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    vae, z = tiny_comfy_vae("flux"), latent("flux", height=4, width=4)
    decode = pack_nodes["ParaAttnParallelVAEDecode"]().decode
    with pytest.raises(ValueError, match="Parallel VAE Decode: gpus=2"):
        decode({"samples": z}, vae, 2, 64, 16, 64, 8)
    if where == "windows":  # (a CPU-only torch cannot decode on the stand-in mps device)
        image = decode({"samples": z}, vae, 0, 64, 16, 64, 8)[0]
        assert image.shape[1:3] == (32, 32) and torch.isfinite(image).all()
    assert current_pool() is running_before


def test_cfg_parallel_with_cfg_1_is_refused_in_manual_and_dropped_in_auto_layout(comfyui_path, pack_nodes,
                                                                                   pool_cleanup, caplog, monkeypatch):
    """A FLUX user (CFG 1) who ticks cfg_parallel: a manual layout says what to change; the auto
    layout samples on its sequence layout without cfg parallel, as it does for an odd GPU count."""
    import comfy.samplers

    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    sent_layouts = []  # the layout each run's job carries to the workers (the real function runs)
    real_payload = pool_sampling._job_payload
    monkeypatch.setattr(pool_sampling, "_job_payload",
                        lambda *args: sent_layouts.append(args[-1].config) or real_payload(*args))
    patcher, pos, neg, latent = sampling_inputs("flux")
    model = context_parallel(pack_nodes, patcher, ulysses_degree=1, cfg_parallel=True)
    with pytest.raises(ValueError, match="cfg_parallel needs CFG > 1"):
        comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0)
    assert sent_layouts == []
    auto = context_parallel(pack_nodes, patcher, layout="auto", cfg_parallel=True)
    with caplog.at_level(logging.WARNING, logger="comfy_para_attn"):
        out = comfy_models.sample(auto, pos, neg, latent, steps=2, cfg=1.0)
        assert "cfg_parallel is off for this run: it needs CFG > 1 with a negative prompt; auto layout without " \
               "it: ulysses 1 x ring 2" in caplog.text, caplog.text
        plain = comfy_models.sample(patcher, pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all() and (out - plain).abs().max().item() < POOL_TOL
        caplog.clear()
        with_cfg = comfy_models.sample(auto, pos, neg, latent, steps=2, cfg=3.0)  # both halves: cfg parallel
        assert "cfg_parallel is off" not in caplog.text
    plain = comfy_models.sample(patcher, pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(with_cfg).all() and (with_cfg - plain).abs().max().item() < POOL_TOL
    assert [(c.ulysses, c.ring, c.cfg) for c in sent_layouts] == [(1, 2, 1), (1, 1, 2)]
    # DualCFGGuider keeps its two scales to itself: the error names it (it said "CFG > 1" of a CFG of 3)
    dual = comfy_extras_module(comfyui_path, "nodes_custom_sampler").Guider_DualCFG(model)
    dual.set_cfg(3.0, 2.0)
    dual.set_conds(pos, neg, neg)
    with pytest.raises(ValueError, match=r"this run's Guider_DualCFG reports CFG 1.0; turn cfg_parallel off on the "
                                         r"Context Parallel node for this sampler\.$"):
        dual.sample(latent, latent, comfy.samplers.sampler_object("euler"), torch.tensor([1.0, 0.5, 0.0]), seed=0)


def test_conditioning_that_cannot_travel_is_named_before_any_worker_runs(comfyui_path, pack_nodes, pool_cleanup):
    """The payload is pickled once; when that fails, the error names the part that cannot
    travel (here another pack's lock in the conds)."""
    import threading

    from comfy_para_attn.adapters.comfy.portable import NotPortableError
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    pos = [[tensor, {**extra, "some_pack_hook": threading.Lock()}] for tensor, extra in pos]
    with pytest.raises(NotPortableError, match="cannot send the conditioning"):
        comfy_models.sample(context_parallel(pack_nodes, patcher), pos, neg, latent, steps=2, cfg=1.0)
    # the model's options and object patches: named by their key, only when the payload fails
    class Unpicklable:  # survives ComfyUI's deepcopy of model_options, not pickle
        def __deepcopy__(self, memo):
            return self

        def __reduce__(self):
            raise TypeError("this object cannot be pickled")

    locked = patcher.clone()
    locked.model_options["transformer_options"]["some_pack_state"] = Unpicklable()
    with pytest.raises(NotPortableError, match=r"cannot send transformer_options\['some_pack_state'\]"):
        comfy_models.sample(context_parallel(pack_nodes, locked), *sampling_inputs("flux")[1:], steps=2, cfg=1.0)
    locked = patcher.clone()
    locked.add_object_patch("some_pack_object", Unpicklable())
    with pytest.raises(NotPortableError, match=r"cannot send object patch 'some_pack_object'"):
        comfy_models.sample(context_parallel(pack_nodes, locked), *sampling_inputs("flux")[1:], steps=2, cfg=1.0)


@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "wan"])
def test_an_image_too_small_for_the_ranks_is_refused_before_any_worker_runs(comfyui_path, pack_nodes, pool_cleanup,
                                                                          family):
    """A 16x16 image is one token: a rank with none failed inside ComfyUI's block with a reshape
    error, and the failure shut the pool down. Now a clear error, the pool untouched; with
    cfg_parallel (tokens not split) it samples. The same for a prompt of one text token, where
    the text is split too."""
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, _ = sampling_inputs(family)
    latent = torch.randn(comfy_models.latent_shape(family, height=2, width=2, frames=1))
    before = current_pool()
    with pytest.raises(ValueError, match="makes 1 image token.*fewer than the 2 GPUs"):
        comfy_models.sample(context_parallel(pack_nodes, patcher), pos, neg, latent, steps=2, cfg=1.0)
    assert current_pool() is before
    cfg_split = context_parallel(pack_nodes, patcher, ulysses_degree=1, cfg_parallel=True)
    out = comfy_models.sample(cfg_split, pos, neg, latent, steps=2, cfg=3.0)
    plain = comfy_models.sample(patcher, pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < POOL_TOL
    if family == "wan":
        return  # Wan splits only the image: its cross-attention keys are the whole prompt
    # a one-token prompt (HunyuanVideo's text encoder cuts an empty negative prompt to about one)
    short_negative = comfy_models.conditioning(patcher, tokens=1, seed=2)
    before = current_pool()
    latent = torch.randn(comfy_models.latent_shape(family), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="negative prompt encodes to 1 text token.*fewer than the 2 GPUs"):
        comfy_models.sample(context_parallel(pack_nodes, patcher), pos, short_negative, latent, steps=2, cfg=3.0)
    assert current_pool() is before
    # at cfg 1 ComfyUI never runs the negative: the graph samples as in-process
    out = comfy_models.sample(context_parallel(pack_nodes, patcher), pos, short_negative, latent, steps=2, cfg=1.0)
    plain = comfy_models.sample(patcher, pos, short_negative, latent, steps=2, cfg=1.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < POOL_TOL
    # but DualCFGGuider runs its negative whatever its inherited `cfg` (1.0) says: still refused
    import comfy.samplers

    dual = comfy_extras_module(comfyui_path, "nodes_custom_sampler").Guider_DualCFG(context_parallel(pack_nodes, patcher))
    dual.set_cfg(3.0, 2.0)
    dual.set_conds(pos, pos, short_negative)
    with pytest.raises(ValueError, match="negative prompt encodes to 1 text token"):
        dual.sample(latent, latent, comfy.samplers.sampler_object("euler"), torch.tensor([1.0, 0.5, 0.0]), seed=0)
    assert current_pool() is before


@pytest.mark.parametrize("family, kind", [("flux", "attn1_patch"), ("flux", "double_block"), ("wan", "double_block")])
def test_attention_patches_of_other_nodes_are_refused_where_tokens_are_split(comfyui_path, pack_nodes,
                                                                           pool_cleanup, family, kind):
    """Newer ComfyUI's FLUX and Wan blocks hand `attn1_patch`es (its FluxKVCache) and Wan's
    `double_block` hooks every token: under split tokens they would see one rank's share and
    change the result silently. Where the blocks call the patch (in-process sampling shows it)
    it is refused before any worker runs; where they do not (0.3.x; FLUX's double_block
    patches everywhere), sampling goes on. cfg parallel alone, which runs whole model calls,
    samples either way."""
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import (ATTENTION_PATCH_CALLS, sampling_inputs,
                                                           unchanged_attention, unchanged_block)

    patcher, pos, neg, latent = sampling_inputs(family)
    patched = patcher.clone()
    patched.set_model_patch(unchanged_attention if kind == "attn1_patch" else unchanged_block, kind)
    ATTENTION_PATCH_CALLS.clear()
    plain = comfy_models.sample(patched, pos, neg, latent, steps=2, cfg=1.0)
    before = current_pool()
    if ATTENTION_PATCH_CALLS:
        with pytest.raises(ValueError, match=f"cannot split the tokens of a model with {kind} patches"):
            comfy_models.sample(context_parallel(pack_nodes, patched), pos, neg, latent, steps=2, cfg=1.0)
        assert current_pool() is before
    else:
        out = comfy_models.sample(context_parallel(pack_nodes, patched), pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all() and (out - plain).abs().max() < POOL_TOL
    cfg_split = context_parallel(pack_nodes, patched, ulysses_degree=1, cfg_parallel=True)
    out = comfy_models.sample(cfg_split, pos, neg, latent, steps=2, cfg=3.0)
    plain = comfy_models.sample(patched, pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < POOL_TOL


def test_a_dual_model_guider_is_refused_with_what_to_change(comfyui_path, pack_nodes, pool_cleanup):
    """Newer ComfyUI's dual-model guider (the negative on a second model) under Context
    Parallel: a clear refusal before any worker runs (it failed on pickling a class of that
    model's layers, naming ComfyUI internals)."""
    import comfy.samplers

    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    extras = comfy_extras_module(comfyui_path, "nodes_custom_sampler")
    if not hasattr(extras, "Guider_DualModel"):
        pytest.skip("this ComfyUI has no dual-model guider")
    patcher, pos, neg, latent = sampling_inputs("wan")
    guider = extras.Guider_DualModel(context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), patcher.clone())
    guider.set_conds(pos, neg)
    guider.set_cfg(3.0)
    before = current_pool()
    with pytest.raises(ValueError, match="does not support a guider with a second model"):
        guider.sample(latent, latent, comfy.samplers.sampler_object("euler"), torch.tensor([1.0, 0.5, 0.0]), seed=0)
    assert current_pool() is before


def test_an_unsupported_model_passes_nodes_that_are_off_and_is_refused_with_the_fix_by_those_on(
        comfyui_path, pack_nodes, pool_cleanup):
    """An SD1.5 UNet: First Block Cache at threshold 0 and Context Parallel with gpus 1 change
    nothing, so they return the model as it came (DESIGN: each feature is a no-op-safe toggle);
    turned on, both refuse it before sampling and say to bypass the node."""
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models

    unet = comfy_models.build_sd15_unet()
    cache = pack_nodes["ParaAttnFirstBlockCache"]()
    assert cache.apply(unet, 0.0, 0.0, 1.0, -1)[0] is unet
    assert context_parallel(pack_nodes, unet, gpus=1, ulysses_degree=1) is unet
    running_before = current_pool()
    for refused in (lambda: cache.apply(unet, 0.12, 0.0, 1.0, -1), lambda: context_parallel(pack_nodes, unet)):
        with pytest.raises(ValueError, match=r"does not support this model .*UNetModel.*Bypass the node"):
            refused()
    assert current_pool() is running_before
