"""The Context Parallel node in real ComfyUI: sampling runs in a pool of 2 CPU worker
processes (gloo) and equals in-process sampling (comfyui tier, fp32, tiny random models)."""

import logging
import pickle

import pytest
import torch

TOL = 2e-4


def _cp(pack_nodes, model, **kw):
    args = dict(gpus=2, layout="manual", ulysses_degree=2, ring_degree=1, cfg_parallel=False, timeout_s=120.0)
    args.update(kw)
    return pack_nodes["ParaAttnContextParallel"]().apply(model, **args)[0]


@pytest.fixture(scope="module")
def pool_cleanup():
    yield
    from comfy_para_attn.pool import shutdown_pool

    shutdown_pool()


@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "wan"])
def test_pool_sampling_equals_in_process(comfyui_path, pack_nodes, pool_cleanup, family):
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs(family)
    cases = [
        dict(sampler_name="euler", cfg=1.0, layout=dict(ulysses_degree=2)),
        dict(sampler_name="dpmpp_2m", cfg=3.0, denoise=0.6, layout=dict(ulysses_degree=1, ring_degree=2)),
        dict(sampler_name="euler", cfg=3.0, layout=dict(ulysses_degree=1, cfg_parallel=True)),
    ]
    for case in cases:
        layout = case.pop("layout")
        plain = comfy_models.sample(patcher, pos, neg, latent, steps=4, **case)
        parallel = comfy_models.sample(_cp(pack_nodes, patcher, **layout), pos, neg, latent, steps=4, **case)
        assert torch.isfinite(parallel).all()
        assert plain.abs().mean() > 1e-3
        err = (parallel - plain).abs().max().item()
        assert err < TOL, f"{family} {case} {layout}: max abs err {err:.3g}"


@pytest.mark.parametrize("sampler_name", ["uni_pc", "ipndm"])
def test_workers_sample_without_autograd(comfyui_path, pack_nodes, pool_cleanup, sampler_name):
    """uni_pc and ipndm do not turn autograd off themselves (ComfyUI's executor does, with
    inference_mode). The workers must too: with autograd on, every model call recorded its graph
    (ComfyUI's weights require grad), and on gloo the ring's gather failed on a view made in
    no-grad mode (Wan with FP8 through the shipped workflow)."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import refuse_autograd, sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("wan")
    model = patcher.clone()
    model.set_model_unet_function_wrapper(refuse_autograd)
    with torch.inference_mode():  # as ComfyUI's executor runs a node
        plain = comfy_models.sample(model, pos, neg, latent, steps=4, cfg=3.0, sampler_name=sampler_name)
    parallel = comfy_models.sample(_cp(pack_nodes, model, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                                   steps=4, cfg=3.0, sampler_name=sampler_name)
    assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
    err = (parallel - plain).abs().max().item()
    assert err < TOL, f"{sampler_name}: max abs err {err:.3g}"


def test_hunyuan_video_image_to_video_in_the_pool(comfyui_path, pack_nodes, pool_cleanup):
    """HunyuanVideo image-to-video (guiding_frame_index: the first frame's tokens have their own
    modulation) through the node: the cond reaches the workers and each rank modulates its own
    tokens (the first frame ends inside rank 0's shard)."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("hunyuan_video", tokens=7, latent=dict(frames=3, height=6, width=10))
    without = comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=1.0)
    pos = [[t, {**extra, "guiding_frame_index": 0}] for t, extra in pos]
    plain = comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=1.0)
    parallel = comfy_models.sample(_cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                                   steps=3, cfg=1.0)
    assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
    assert (plain - without).abs().max() > 1e-2  # the first frame's own modulation matters
    err = (parallel - plain).abs().max().item()
    assert err < TOL, f"max abs err {err:.3g}"


def test_bad_layouts_are_rejected_before_sampling(comfyui_path, pack_nodes):
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, *_ = sampling_inputs("flux")
    # In the node's own input names, with the ways out.
    with pytest.raises(ValueError, match=r"ulysses_degree 2 x ring_degree 2 = 4, but there are 2 CPU ranks\. "
                                         r"Make the product 2, set gpus to 4, or set layout to auto"):
        _cp(pack_nodes, patcher, ulysses_degree=2, ring_degree=2)
    with pytest.raises(ValueError, match=r"x 2 \(cfg_parallel\) = 4, but there are 2 CPU ranks \(gpus 0: all visible\)"):
        _cp(pack_nodes, patcher, gpus=0, ulysses_degree=2, cfg_parallel=True)
    with pytest.raises(ValueError, match="does not divide the model's 4.*layout auto picks a valid one"):
        _cp(pack_nodes, patcher, gpus=3, ulysses_degree=3)
    with pytest.raises(ValueError, match=r"gpus=4096 CPU ranks .*each rank holds the whole model.*Set gpus to at most"):
        _cp(pack_nodes, patcher, gpus=4096, ulysses_degree=4096)


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
    assert chosen(_cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)) == "sdpa"
    assert chosen(_cp(pack_nodes, with_triton, ulysses_degree=1, ring_degree=2)) == "triton"
    assert chosen(_cp(pack_nodes, with_triton, ulysses_degree=1, ring_degree=2, attention_backend="sdpa")) == "sdpa"
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        _cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2, attention_backend="flash")


def test_one_gpu_samples_in_this_process(comfyui_path, pack_nodes):
    """gpus 1: no worker pool (it would only add the weights' transfer); the model samples as
    it is, with the node's attention backend if it names one."""
    from comfy_para_attn.adapters.comfy.attention_backend import BackendAttention
    from comfy_para_attn.adapters.comfy.pool_sampling import FEATURE
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    same = _cp(pack_nodes, patcher, gpus=1, ulysses_degree=1)
    assert same is patcher
    routed = _cp(pack_nodes, patcher, gpus=1, ulysses_degree=1, attention_backend="triton")
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
    assert _cp(pack_nodes, patcher, gpus=0, ulysses_degree=1) is patcher
    with pytest.raises(ValueError, match=f"gpus=2, but {expected} cannot run the worker pool.*Set gpus to 0 or 1"):
        _cp(pack_nodes, patcher, gpus=2, ulysses_degree=1)
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
    model = _cp(pack_nodes, patcher, ulysses_degree=1, cfg_parallel=True)
    with pytest.raises(ValueError, match="cfg_parallel needs CFG > 1"):
        comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0)
    assert sent_layouts == []
    auto = _cp(pack_nodes, patcher, layout="auto", cfg_parallel=True)
    with caplog.at_level(logging.WARNING, logger="comfy_para_attn"):
        out = comfy_models.sample(auto, pos, neg, latent, steps=2, cfg=1.0)
        assert "cfg_parallel is off for this run: it needs CFG > 1 with a negative prompt; auto layout without " \
               "it: ulysses 1 x ring 2" in caplog.text, caplog.text
        plain = comfy_models.sample(patcher, pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all() and (out - plain).abs().max().item() < TOL
        caplog.clear()
        with_cfg = comfy_models.sample(auto, pos, neg, latent, steps=2, cfg=3.0)  # both halves: cfg parallel
        assert "cfg_parallel is off" not in caplog.text
    plain = comfy_models.sample(patcher, pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(with_cfg).all() and (with_cfg - plain).abs().max().item() < TOL
    assert [(c.ulysses, c.ring, c.cfg) for c in sent_layouts] == [(1, 2, 1), (1, 1, 2)]
    # DualCFGGuider keeps its two scales to itself: the error names it (it said "CFG > 1" of a CFG of 3)
    dual = _comfy_extras(comfyui_path, "nodes_custom_sampler").Guider_DualCFG(model)
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
        comfy_models.sample(_cp(pack_nodes, patcher), pos, neg, latent, steps=2, cfg=1.0)
    # the model's options and object patches: named by their key, only when the payload fails
    class Unpicklable:  # survives ComfyUI's deepcopy of model_options, not pickle
        def __deepcopy__(self, memo):
            return self

        def __reduce__(self):
            raise TypeError("this object cannot be pickled")

    locked = patcher.clone()
    locked.model_options["transformer_options"]["some_pack_state"] = Unpicklable()
    with pytest.raises(NotPortableError, match=r"cannot send transformer_options\['some_pack_state'\]"):
        comfy_models.sample(_cp(pack_nodes, locked), *sampling_inputs("flux")[1:], steps=2, cfg=1.0)
    locked = patcher.clone()
    locked.add_object_patch("some_pack_object", Unpicklable())
    with pytest.raises(NotPortableError, match=r"cannot send object patch 'some_pack_object'"):
        comfy_models.sample(_cp(pack_nodes, locked), *sampling_inputs("flux")[1:], steps=2, cfg=1.0)


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
        comfy_models.sample(_cp(pack_nodes, patcher), pos, neg, latent, steps=2, cfg=1.0)
    assert current_pool() is before
    cfg_split = _cp(pack_nodes, patcher, ulysses_degree=1, cfg_parallel=True)
    out = comfy_models.sample(cfg_split, pos, neg, latent, steps=2, cfg=3.0)
    plain = comfy_models.sample(patcher, pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < TOL
    if family == "wan":
        return  # Wan splits only the image: its cross-attention keys are the whole prompt
    # a one-token prompt (HunyuanVideo's text encoder cuts an empty negative prompt to about one)
    short_negative = comfy_models.conditioning(patcher, tokens=1, seed=2)
    before = current_pool()
    latent = torch.randn(comfy_models.latent_shape(family), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="negative prompt encodes to 1 text token.*fewer than the 2 GPUs"):
        comfy_models.sample(_cp(pack_nodes, patcher), pos, short_negative, latent, steps=2, cfg=3.0)
    assert current_pool() is before
    # at cfg 1 ComfyUI never runs the negative: the graph samples as in-process
    out = comfy_models.sample(_cp(pack_nodes, patcher), pos, short_negative, latent, steps=2, cfg=1.0)
    plain = comfy_models.sample(patcher, pos, short_negative, latent, steps=2, cfg=1.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < TOL
    # but DualCFGGuider runs its negative whatever its inherited `cfg` (1.0) says: still refused
    import comfy.samplers

    dual = _comfy_extras(comfyui_path, "nodes_custom_sampler").Guider_DualCFG(_cp(pack_nodes, patcher))
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
            comfy_models.sample(_cp(pack_nodes, patched), pos, neg, latent, steps=2, cfg=1.0)
        assert current_pool() is before
    else:
        out = comfy_models.sample(_cp(pack_nodes, patched), pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all() and (out - plain).abs().max() < TOL
    cfg_split = _cp(pack_nodes, patched, ulysses_degree=1, cfg_parallel=True)
    out = comfy_models.sample(cfg_split, pos, neg, latent, steps=2, cfg=3.0)
    plain = comfy_models.sample(patched, pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < TOL


def test_inpaint_mask_and_partial_schedule(comfyui_path, pack_nodes, pool_cleanup):
    """KSamplerAdvanced-style partial schedules (start/last step) and a denoise mask."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    mask = (torch.rand((1, 1) + tuple(latent.shape[-2:]), generator=torch.Generator().manual_seed(4)) > 0.5).float()
    # a batch of two, each image its own mask (newer ComfyUI hands the mask over prepared)
    batch = torch.cat([latent, latent.flip(-1)])
    masks = torch.stack([mask[0, 0], 1.0 - mask[0, 0]])  # [B, H, W], as SetLatentNoiseMask stores it
    cases = [
        dict(noise_mask=mask, cfg=2.0),
        dict(start_step=1, last_step=3, force_full_denoise=False, cfg=1.0),
        dict(noise_mask=masks, cfg=2.0, latent=batch),
    ]
    for case in cases:
        latent_image = case.pop("latent", latent)
        plain = comfy_models.sample(patcher, pos, neg, latent_image, steps=4, **case)
        parallel = comfy_models.sample(_cp(pack_nodes, patcher), pos, neg, latent_image, steps=4, **case)
        assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
        err = (parallel - plain).abs().max().item()
        assert err < TOL, f"{list(case)}: max abs err {err:.3g}"


def test_second_prompt_reuses_workers_model_and_logs_phases(comfyui_path, pack_nodes, pool_cleanup):
    """Every rank logs where its time went; the second prompt finds the weights cached (the
    first may too: earlier tests in this module sent the same weights to a pool of this layout)."""
    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    model = _cp(pack_nodes, patcher, ulysses_degree=2)
    phases = []
    for seed in (1, 2):
        out = comfy_models.sample(model, pos, neg, latent, steps=3, cfg=1.0, seed=seed)
        assert torch.isfinite(out).all()
        phases.append([[line for line in lines if line.startswith(f"Context Parallel rank {rank}: model")]
                       for rank, lines in enumerate(pool_sampling.last_run_logs)])
    for prompt, states in zip(phases, (("loaded", "cached"), ("cached",))):
        assert len(prompt) == 2 and all(len(lines) == 1 for lines in prompt), prompt
        for lines in prompt:
            assert any(f"model {state} in" in lines[0] for state in states), lines
            assert "first step" in lines[0] and "2 more in" in lines[0], lines
            setup = float(lines[0].split("sampler set up in ")[1].split(" s")[0])  # nan if no model call was seen
            assert 0.0 <= setup < 60.0, lines


def test_workers_profile_the_prompts_of_the_asked_length(comfyui_path, pack_nodes, pool_cleanup, monkeypatch):
    """PARA_ATTN_PROFILE=N (in the environment the pool starts with) makes every rank profile
    the prompts of N steps and log a summary; other prompts run unprofiled."""
    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.pool import shutdown_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    model = _cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)
    shutdown_pool()
    monkeypatch.setenv("PARA_ATTN_PROFILE", "3")
    try:
        profiled = {}
        for steps in (3, 2):
            out = comfy_models.sample(model, pos, neg, latent, steps=steps, cfg=1.0, seed=1)
            assert torch.isfinite(out).all()
            profiled[steps] = [[line for line in lines if " profile: " in line] for lines in pool_sampling.last_run_logs]
        for rank, lines in enumerate(profiled[3]):
            assert lines and lines[0].startswith(f"Context Parallel rank {rank} profile: "), lines
            assert float(lines[0].split("profile: ")[1].split(" ms/step")[0]) > 0, lines
            assert any(" host " in line for line in lines), lines  # the top host ops (no GPU here)
        assert profiled[2] == [[], []], profiled[2]
    finally:
        shutdown_pool()  # later tests get a pool started without the variable


@pytest.mark.parametrize("previews,sampler", [(False, "euler"), (True, "euler"), (False, "dpm_fast")])
def test_progress_carries_denoised_latent_for_previews_and_at_the_end(comfyui_path, pack_nodes, pool_cleanup,
                                                                      monkeypatch, previews, sampler):
    """Every step reaches ComfyUI's callback; the denoised latent (x0) travels on every step
    only with previews on (copying it syncs the GPU); otherwise it comes once after sampling,
    as a repeat of the last callback, equal to in-process sampling's last x0 (SamplerCustom
    and SamplerCustomAdvanced output it). dpm_fast calls back fewer times than it has steps."""
    from comfy.cli_args import LatentPreviewMethod, args

    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Auto if previews else LatentPreviewMethod.NoPreviews)
    patcher, pos, neg, latent = sampling_inputs("flux")
    seen = {"plain": [], "parallel": []}
    for name, model in (("plain", patcher), ("parallel", _cp(pack_nodes, patcher))):
        def callback(step, x0, x, total, into=seen[name]):
            into.append((step, total, None if x0 is None else x0.detach().float().cpu().clone()))
        comfy_models.sample(model, pos, neg, latent, steps=6, cfg=1.0, sampler_name=sampler, callback=callback)
    plain, parallel = seen["plain"], seen["parallel"]
    calls = [(s, t) for s, t, _ in plain]
    assert len(calls) >= 2
    carried = [x0 is not None for _, _, x0 in parallel]
    if previews:
        assert [(s, t) for s, t, _ in parallel] == calls and all(carried)
    else:
        assert [(s, t) for s, t, _ in parallel] == calls + calls[-1:]  # the last one again, with x0
        assert carried == [False] * len(calls) + [True]
    last_plain, last_parallel = plain[-1][2], parallel[-1][2]
    assert torch.isfinite(last_parallel).all() and last_plain.abs().mean() > 1e-3
    assert (last_parallel - last_plain).abs().max().item() < TOL


def test_compiled_model_runs_in_the_pool_and_its_weights_never_ride_in_the_payload(comfyui_path, pack_nodes,
                                                                                   pool_cleanup, monkeypatch):
    """Compile -> Context Parallel: equal to in-process, and the job message stays small.
    ComfyUI copies every wrapper into model_options["to_load_options"] while sampling; ours
    hold the compiled blocks, so shipping that copy pickled the whole model per prompt
    (on 2 H200s, 4 minutes of a 12B model's first compiled prompt)."""
    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import record_sampling_jobs, sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    compiled = apply_compile(patcher, CompileSettings(backend="eager"))  # dynamo's graphs; inductor adds minutes on CPU
    jobs = record_sampling_jobs(monkeypatch)
    plain = comfy_models.sample(compiled, pos, neg, latent, steps=3, cfg=1.0)  # fills to_load_options
    parallel = comfy_models.sample(_cp(pack_nodes, compiled), pos, neg, latent, steps=3, cfg=1.0)
    weight_bytes = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    sizes = [len(data) for data, _ in jobs]
    assert jobs and all("model_options" in payload for _, payload in jobs)
    assert max(sizes) < weight_bytes / 10, (sizes, weight_bytes)
    assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
    assert (parallel - plain).abs().max().item() < TOL


def test_a_lora_samples_in_the_pool_as_in_process_and_its_tensors_travel_once(comfyui_path, pack_nodes, pool_cleanup,
                                                                             monkeypatch, caplog):
    """LoRA -> Context Parallel equals LoRA in-process at two strengths. The LoRA's matrices
    and the conds travel with the first job only: later jobs send their tokens (every tensor
    travels by token here; the real threshold, 16 KiB, is larger than a tiny model's), and a
    new strength (a new patches_uuid, the same matrices) is applied in the workers."""
    from comfy_para_attn.pool import sent_once
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import record_sampling_jobs, sampling_inputs

    monkeypatch.setattr(sent_once, "MIN_BYTES", 0)
    patcher, pos, neg, latent = sampling_inputs("flux")
    lora = comfy_models.random_lora(patcher, scale=1.0, max_layers=12)
    jobs = record_sampling_jobs(monkeypatch)
    caplog.set_level(logging.INFO, logger="comfy_para_attn")
    outputs = {}
    for strength, seed in ((1.0, 1), (1.0, 2), (0.5, 2)):
        with_lora = comfy_models.apply_lora(patcher, lora, strength)
        plain = comfy_models.sample(with_lora, pos, neg, latent, steps=3, cfg=1.0, seed=seed)
        parallel = comfy_models.sample(_cp(pack_nodes, with_lora), pos, neg, latent, steps=3, cfg=1.0, seed=seed)
        assert torch.isfinite(parallel).all()
        assert (parallel - plain).abs().max().item() < TOL, (strength, seed)
        outputs[strength, seed] = parallel
    no_lora = comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=1.0, seed=2)
    assert (outputs[1.0, 2] - no_lora).abs().max() > 1e-3 and (outputs[1.0, 2] - outputs[0.5, 2]).abs().max() > 1e-3
    envelopes = [pickle.loads(data) for data, _ in jobs]
    lora_tensors = sum(1 for key in lora if not key.endswith(".alpha"))
    assert len(envelopes[0]["new"]) >= lora_tensors  # with the conds and the model's other tensors
    assert envelopes[1]["new"] == {} and envelopes[2]["new"] == {}, [list(e["new"]) for e in envelopes]
    assert len(jobs[1][0]) < len(jobs[0][0]) / 2
    kept = [int(r.getMessage().split(" tensor(s) the workers kept")[0].rsplit(" ", 1)[1]) for r in caplog.records
            if " tensor(s) the workers kept" in r.getMessage()]
    assert kept == [0, len(envelopes[0]["new"]), len(envelopes[0]["new"])], kept  # the log says what was reused


def test_unloading_all_models_lets_go_of_the_last_prompts_tensors_on_both_sides(comfyui_path, pack_nodes,
                                                                                pool_cleanup, monkeypatch):
    """ComfyUI's "Unload Models" / "Free model and node cache" release what the last prompt
    sent (a LoRA can be hundreds of MiB) in ComfyUI and in every worker; the next prompt sends
    its tensors again and samples as in-process."""
    import comfy.model_management

    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.adapters.comfy.worker_jobs import SENT_ONCE_KEY
    from comfy_para_attn.pool import current_pool, sent_once
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import record_sampling_jobs, sampling_inputs

    monkeypatch.setattr(sent_once, "MIN_BYTES", 0)
    patcher, pos, neg, latent = sampling_inputs("flux")
    with_lora = comfy_models.apply_lora(patcher, comfy_models.random_lora(patcher, scale=1.0))
    model = _cp(pack_nodes, with_lora)
    jobs = record_sampling_jobs(monkeypatch)

    def held_by_workers():
        cached = current_pool().run("comfy_para_attn.testing.pool_jobs:gather_from_ranks", ("cache", SENT_ONCE_KEY),
                                    timeout_s=60)
        return [None if c is None else len(c) for c in cached]

    comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0, seed=1)
    sent = len(pickle.loads(jobs[0][0])["new"])
    assert sent > 0 and held_by_workers() == [sent, sent]
    comfy.model_management.unload_all_models()
    assert held_by_workers() == [None, None] and len(pool_sampling._sent_once._held) == 0
    plain = comfy_models.sample(with_lora, pos, neg, latent, steps=2, cfg=1.0, seed=2)
    parallel = comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0, seed=2)
    assert len(pickle.loads(jobs[-1][0])["new"]) == sent
    assert torch.isfinite(parallel).all() and (parallel - plain).abs().max().item() < TOL


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


def test_a_replaced_model_is_dropped_by_the_workers_and_another_config_is_another_model(
        comfyui_path, pack_nodes, pool_cleanup, caplog, monkeypatch):
    """Switching models, one kept (PARA_ATTN_KEEP_MODELS=1): the workers drop the old one
    before the new one is written (their mapping kept the replaced file's pages in /dev/shm, so
    a /dev/shm sized for one model failed on the switch, and on every prompt after). The same
    weights under another model config (UNETLoader's fp8_e4m3fn_fast changes only the config)
    are another model there."""
    import logging
    from pathlib import Path

    import psutil

    from comfy_para_attn.adapters.comfy import pool_sampling, published

    monkeypatch.setitem(published.KEEP, "model", 1)
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    first, pos, neg, latent = sampling_inputs("flux", seed=0)
    second, *_ = sampling_inputs("flux", seed=5)

    def run(patcher):
        out = comfy_models.sample(_cp(pack_nodes, patcher, ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
        states = [line for lines in pool_sampling.last_run_logs for line in lines if ": model " in line]
        return out, states

    run(first)
    from comfy_para_attn.adapters.comfy import published

    old_file = published._published[published._recent["model"][-1]].path
    workers = [p for p in psutil.Process().children(recursive=True) if "comfy_para_attn.pool.worker" in " ".join(p.cmdline())]

    def mapped() -> list[bool]:
        return [old_file in Path(f"/proc/{worker.pid}/maps").read_text() for worker in workers]

    assert len(workers) == 2 and mapped() == [True, True]  # every rank maps the weights' file
    assert published.unmap_in_workers("model", why="test") == 1 and mapped() == [False, False]
    run(first)  # loads it again
    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        caplog.clear()
        out, states = run(second)
        assert "workers dropped their cached model (1) before the new one is written" in caplog.text
        assert mapped() == [False, False]
        plain = comfy_models.sample(second, pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all() and (out - plain).abs().max().item() < TOL
        assert len(states) == 2 and all("model loaded in" in line for line in states), states
        _, states = run(second)
        assert all("model cached in" in line for line in states), states
        second.model.model_config.manual_cast_dtype = torch.float32  # same weights and ops, another config
        caplog.clear()
        out, states = run(second)
        assert all("model loaded in" in line for line in states), states
        assert "dropped" not in caplog.text  # the weights did not change: no new file
        assert (out - plain).abs().max().item() < TOL


def test_two_models_alternating_stay_written_and_loaded(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """Wan 2.2 samples with two experts in every prompt: both stay in shared memory and in the
    workers (two are kept by default), so alternating them writes and loads each once; a third
    model evicts the least recently used one, in /dev/shm and in the workers."""
    import logging

    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    models = {}
    models["a"], pos, neg, latent = sampling_inputs("flux", seed=11)
    models["b"], *_ = sampling_inputs("flux", seed=12)
    models["c"], *_ = sampling_inputs("flux", seed=13)

    def run(name) -> tuple[int, list[str]]:
        caplog.clear()
        out = comfy_models.sample(_cp(pack_nodes, models[name], ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all()
        states = [line.split(": model ")[1].split(" in ")[0] for lines in pool_sampling.last_run_logs
                  for line in lines if ": model " in line]
        assert len(set(states)) == 1, states  # every rank the same
        return caplog.text.count("written to shared memory"), states[0], caplog.text

    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        assert run("a")[:2] == (1, "loaded") and run("b")[:2] == (1, "loaded")
        assert run("a")[:2] == (0, "cached") and run("b")[:2] == (0, "cached")
        written, state, log = run("c")  # "a" is the least recently used
        assert (written, state) == (1, "loaded")
        assert "workers dropped their cached model (1) before the new one is written (to keep 2)" in log, log
        assert run("b")[:2] == (0, "cached")
        assert run("a")[:2] == (1, "loaded")  # written and loaded again, "c" now goes


def test_a_freed_model_leaves_the_workers_at_the_next_run(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """Two models kept; ComfyUI frees one (another checkpoint, "Free model and node cache"):
    its shared-memory file goes at once, and the workers drop it at the next run with the other
    model, instead of holding its weights (VRAM, and the unlinked file's pages) until a third
    model evicts it."""
    import gc
    import logging

    from comfy_para_attn.adapters.comfy import published
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    models = {}
    models["a"], pos, neg, latent = sampling_inputs("flux", seed=21)
    models["b"], *_ = sampling_inputs("flux", seed=22)

    def run(name):
        out = comfy_models.sample(_cp(pack_nodes, models[name], ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all()

    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        run("a")
        run("b")
        freed = published._fingerprints[models["a"].model.diffusion_model]
        assert freed in published._recent["model"] and freed in published._published
        caplog.clear()
        del models["a"]
        gc.collect()
        assert "weights released from shared memory (the model was freed)" in caplog.text, caplog.text
        assert freed not in published._published and freed in published._recent["model"]  # workers still hold it
        caplog.clear()
        run("b")
        assert "workers dropped their cached model (1) (its model was freed)" in caplog.text, caplog.text
        assert "written to shared memory" not in caplog.text
        assert freed not in published._recent["model"]


def test_a_freed_model_leaves_the_workers_when_comfyui_makes_room(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """No further Context Parallel run (the user went back to a one-GPU workflow): ComfyUI's own
    `free_memory`, called before it loads any model, makes the workers drop a model ComfyUI
    freed, so they no longer map its unlinked file (nor hold it in VRAM)."""
    import gc
    import logging
    from pathlib import Path

    import comfy.model_management
    import psutil

    from comfy_para_attn.adapters.comfy import published
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux", seed=23)
    out = comfy_models.sample(_cp(pack_nodes, patcher, ulysses_degree=2), pos, neg, latent, steps=2, cfg=1.0)
    assert torch.isfinite(out).all()
    path = published._published[published._fingerprints[patcher.model.diffusion_model]].path
    workers = [p for p in psutil.Process().children(recursive=True) if "comfy_para_attn.pool.worker" in " ".join(p.cmdline())]

    def mapped() -> list[bool]:
        return [path in Path(f"/proc/{worker.pid}/maps").read_text() for worker in workers]

    del patcher
    gc.collect()
    assert len(workers) == 2 and mapped() == [True, True]  # the file is unlinked, its pages still held
    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        caplog.clear()
        comfy.model_management.free_memory(1 << 20, torch.device("cpu"))
        assert "workers dropped their cached model (1) (its model was freed)" in caplog.text, caplog.text
    assert mapped() == [False, False]
    caplog.clear()
    comfy.model_management.free_memory(1 << 20, torch.device("cpu"))  # nothing more to drop: no pool job
    assert "dropped" not in caplog.text


def test_the_workers_make_room_for_comfyui_only_in_prompts_without_a_pool_node(comfyui_path):
    """The graph ComfyUI executes decides whether its loads may make the workers drop their
    models (the release itself needs a GPU: tests/test_memory_gpu.py)."""
    from comfy_execution.graph import DynamicPrompt
    from comfy_execution.progress import reset_progress_state

    from comfy_para_attn.adapters.comfy.memory import prompt_uses_pool

    def graph(*nodes):
        return DynamicPrompt({str(i): {"class_type": c, "inputs": {"gpus": g}} for i, (c, g) in enumerate(nodes)})

    cp, vae = "ParaAttnContextParallel", "ParaAttnParallelVAEDecode"
    for nodes, uses in ((), False), ((("KSampler", 0), ("VAEDecode", 0)), False), (((cp, 0), ("KSampler", 0)), True), \
            ((("KSampler", 0), (vae, 2)), True), ((("KSampler", 0), (vae, ["12", 0])), True), \
            ((("KSampler", 0), (vae, 1)), False):  # the shipped one-GPU workflows: Parallel VAE Decode in-process
        reset_progress_state("test", graph(*nodes))
        assert prompt_uses_pool() is uses, nodes


def test_worker_model_key_follows_the_model_config(comfyui_path):
    from comfy_para_attn import refs
    from comfy_para_attn.adapters.comfy.worker_jobs import config_key
    from comfy_para_attn.testing import comfy_models

    def copy_of(config):  # as it reaches the workers (newer ComfyUI's configs do not deep-copy)
        return pickle.loads(refs.dumps(config))

    config = comfy_models.build("flux", seed=0).model.model_config
    same = copy_of(config)
    fast = copy_of(config)
    fast.optimizations = {**config.optimizations, "fp8": True}
    assert config_key(config, "FLUX") == config_key(same, "FLUX")
    assert config_key(fast, "FLUX") != config_key(config, "FLUX") != config_key(config, "FLOW")
    mixed = copy_of(config)  # newer ComfyUI's per-layer quantization of a checkpoint
    mixed.quant_config = {"layers": {"double_blocks.0.img_attn.qkv": {"format": "float8_e4m3fn"}}}
    assert config_key(mixed, "FLUX") != config_key(config, "FLUX")


def test_an_fp8_scaled_checkpoint_samples_in_the_pool_as_in_process(cm, pack_nodes, pool_cleanup):
    """A tiny Wan loaded from an fp8_scaled file (0.3.x: fp8 parameters with their scales;
    newer ComfyUI: its mixed-precision QuantizedTensor weights) reaches the workers as it is
    and samples there as in-process (ring x2, fp32 compute, 1e-3)."""
    import comfy.sd

    from comfy_para_attn.testing import tiny_files

    state = tiny_files.random_state_dict(tiny_files.shapes_of("wan"), seed=0)
    model = comfy.sd.load_diffusion_model_state_dict(tiny_files.fp8_scaled_state_dict(state))
    weight = model.model.diffusion_model.blocks[0].self_attn.q.weight
    assert weight.dtype == torch.float8_e4m3fn or type(weight).__name__ == "QuantizedTensor"
    positive = cm.conditioning(model, seed=1)
    latent = torch.randn(cm.latent_shape("wan"), generator=torch.Generator().manual_seed(3))
    plain = cm.sample(model, positive, [], latent, steps=2, cfg=1.0)
    parallel = cm.sample(_cp(pack_nodes, model, ulysses_degree=1, ring_degree=2), positive, [], latent, steps=2, cfg=1.0)
    assert torch.isfinite(parallel).all() and plain.abs().max() > 1
    err = (parallel - plain).abs().max().item()
    assert err < 1e-3, f"max abs err {err:.3g}"


@pytest.mark.parametrize("method", ["index", "index_timestep_zero"])
def test_flux2_reference_latents_in_the_pool(cm, pack_nodes, pool_cleanup, method):
    """Newer ComfyUI's FLUX.2 with a reference latent (an edit): the "index" method samples in
    the pool as in-process; "index_timestep_zero" modulates the reference tokens by their
    place in the whole sequence, which a rank's share lacks (ulysses 2 gave an error of 0.09
    against a mean of 1.2): refused before any worker runs."""
    import comfy.supported_models

    from comfy_para_attn.pool import current_pool

    if not hasattr(comfy.supported_models, "Flux2"):
        pytest.skip("this ComfyUI has no FLUX.2")
    patcher = cm.build("flux2", seed=0)
    g = torch.Generator().manual_seed(1)
    reference = torch.randn(1, 128, 4, 4, generator=g)
    positive = [[torch.randn(1, 7, 32, generator=g),
                 {"guidance": 3.5, "reference_latents": [reference], "reference_latents_method": method}]]
    latent = torch.randn(1, 128, 6, 6, generator=torch.Generator().manual_seed(3)) * 0.5
    parallel = _cp(pack_nodes, patcher)
    if method == "index_timestep_zero":
        before = current_pool()
        with pytest.raises(ValueError, match="reference latents of the 'index_timestep_zero' method"):
            cm.sample(parallel, positive, [], latent, steps=2, cfg=1.0)
        assert current_pool() is before
        return
    plain = cm.sample(patcher, positive, [], latent, steps=2, cfg=1.0)
    out = cm.sample(parallel, positive, [], latent, steps=2, cfg=1.0)
    assert torch.isfinite(out).all() and plain.abs().mean() > 0.1
    err = (out - plain).abs().max().item()
    assert err < TOL, f"max abs err {err:.3g}"


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_a_model_without_single_blocks_samples_in_the_pool_as_in_process(cm, pack_nodes, pool_cleanup, family):
    """ComfyUI detects HunyuanVideo 1.5's checkpoint as double blocks only: the last block,
    which gathers the shards, is then a double block, and its two streams are gathered apart
    (it took the image stream for the joined one: error 2.9 on a tiny HunyuanVideo 1.5)."""
    patcher = cm.build(family, seed=0, depth=3, depth_single_blocks=0)
    assert len(patcher.model.diffusion_model.single_blocks) == 0
    positive = cm.conditioning(patcher, tokens=7, seed=1)
    negative = cm.conditioning(patcher, tokens=5, seed=2)
    latent = torch.randn(cm.latent_shape(family), generator=torch.Generator().manual_seed(3)) * 0.5
    plain = cm.sample(patcher, positive, negative, latent, steps=2, cfg=3.0)
    for layout in (dict(ulysses_degree=2), dict(ulysses_degree=1, ring_degree=2)):
        out = cm.sample(_cp(pack_nodes, patcher, **layout), positive, negative, latent, steps=2, cfg=3.0)
        assert torch.isfinite(out).all() and plain.abs().mean() > 0.1
        err = (out - plain).abs().max().item()
        assert err < TOL, f"{layout}: max abs err {err:.3g}"
    if family == "flux":  # a ControlNet's residual after the gathering (double) block meets the whole image
        hint = torch.rand(1, 3, latent.shape[-2] * 8, latent.shape[-1] * 8, generator=torch.Generator().manual_seed(5))
        control = cm.flux_controlnet(seed=6, depth=3, depth_single_blocks=0).copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
        positive, negative = _with_control(positive, control), _with_control(negative, control)
        plain_control = cm.sample(patcher, positive, negative, latent, steps=2, cfg=3.0)
        assert (plain_control - plain).abs().max() > 1e-2  # the ControlNet steers the result
        out = cm.sample(_cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), positive, negative, latent,
                        steps=2, cfg=3.0)
        err = (out - plain_control).abs().max().item()
        assert torch.isfinite(out).all() and err < TOL, f"ControlNet: max abs err {err:.3g}"


def _with_control(conds, control):
    return [[t, {**extra, "control": control, "control_apply_to_uncond": True}] for t, extra in conds]


@pytest.mark.parametrize("encoder", ["vae", "own"])
def test_a_flux_controlnet_samples_in_the_pool_as_in_process(comfyui_path, pack_nodes, pool_cleanup, encoder):
    """FLUX with a ControlNet (InstantX-style, its hint encoded by a VAE, and XLabs-style, its
    own conv encoder) through the node equals in-process sampling: the ControlNet and its VAE
    reach the workers, and each rank adds the residuals to its own image tokens (ulysses, ring,
    and cfg parallel, where the residuals split with the batch)."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs
    from comfy_para_attn.testing.vae_models import tiny_comfy_vae

    patcher, pos, neg, latent = sampling_inputs("flux", latent=dict(height=6, width=10))
    vae = tiny_comfy_vae("flux", seed=4) if encoder == "vae" else None
    hint = torch.rand(1, 3, 6 * 8, 10 * 8, generator=torch.Generator().manual_seed(5))
    control = comfy_models.flux_controlnet(vae=vae, seed=6).copy().set_cond_hint(hint, 1.0, (0.0, 1.0), vae=vae)
    pos_c, neg_c = _with_control(pos, control), _with_control(neg, control)
    cases = [
        dict(cfg=1.0, layout=dict(ulysses_degree=2)),
        dict(cfg=3.0, layout=dict(ulysses_degree=1, ring_degree=2)),
        dict(cfg=3.0, layout=dict(ulysses_degree=1, cfg_parallel=True)),
    ]
    for case in cases:
        layout = case.pop("layout")
        without = comfy_models.sample(patcher, pos, neg, latent, steps=3, **case)
        plain = comfy_models.sample(patcher, pos_c, neg_c, latent, steps=3, **case)
        assert (plain - without).abs().max() > 1e-2  # the ControlNet steers the result
        parallel = comfy_models.sample(_cp(pack_nodes, patcher, **layout), pos_c, neg_c, latent, steps=3, **case)
        assert torch.isfinite(parallel).all()
        err = (parallel - plain).abs().max().item()
        assert err < TOL, f"{encoder} {case} {layout}: max abs err {err:.3g}"


def test_a_controlnet_on_a_video_model_is_refused_before_any_worker_runs(comfyui_path, pack_nodes, pool_cleanup):
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("hunyuan_video")
    control = comfy_models.flux_controlnet(seed=6)
    with pytest.raises(Exception, match="ControlNet under Context Parallel works with FLUX models only"):
        comfy_models.sample(_cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), _with_control(pos, control),
                            neg, latent, steps=2, cfg=1.0)


def test_a_controlnet_chain_travels_once_and_the_graphs_objects_stay_as_they_are(comfyui_path, pack_nodes,
                                                                                pool_cleanup, monkeypatch):
    """Two chained ControlNets (the first with a VAE), shared by both prompts: the pool's
    output equals in-process sampling; the chain reaches the workers as one object with
    stand-ins for the VAE and the class's lambda, with the first job only (the next sends
    tokens); the graph's own objects keep their VAE and lambda."""
    from comfy_para_attn.adapters.comfy.controlnets import ClassDefault, PublishedVAE, controls_model_bytes
    from comfy_para_attn.pool import sent_once
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import record_sampling_jobs, sampling_inputs
    from comfy_para_attn.testing.vae_models import tiny_comfy_vae

    monkeypatch.setattr(sent_once, "MIN_BYTES", 0)
    patcher, pos, neg, latent = sampling_inputs("flux", latent=dict(height=6, width=10))
    vae = tiny_comfy_vae("flux", seed=4)
    hint = torch.rand(1, 3, 6 * 8, 10 * 8, generator=torch.Generator().manual_seed(5))
    first = comfy_models.flux_controlnet(vae=vae, seed=6).copy().set_cond_hint(hint, 0.7, (0.0, 1.0), vae=vae)
    second = comfy_models.flux_controlnet(seed=7).copy().set_cond_hint(hint, 0.5, (0.0, 0.6))
    second.set_previous_controlnet(first)
    lambda_before = first.preprocess_image
    pos_c, neg_c = _with_control(pos, second), _with_control(neg, second)
    plain = comfy_models.sample(patcher, pos_c, neg_c, latent, steps=3, cfg=2.0)
    import comfy.model_management as mm

    def loaded_here():  # ControlNet models ComfyUI holds loaded in this process
        return [m for m in mm.current_loaded_models if m.model in (first.control_model_wrapped,
                                                                   second.control_model_wrapped)]

    assert len(loaded_here()) == 2  # the in-process run left them loaded
    jobs = record_sampling_jobs(monkeypatch)
    model = _cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)
    parallel = comfy_models.sample(model, pos_c, neg_c, latent, steps=3, cfg=2.0)
    assert torch.isfinite(parallel).all() and (parallel - plain).abs().max().item() < TOL
    comfy_models.sample(model, pos_c, neg_c, latent, steps=3, cfg=2.0, seed=1)
    assert first.preprocess_image is lambda_before and first.vae is vae and second.previous_controlnet is first
    assert loaded_here() == []  # unloaded here: they travel as plain modules, with no load state
    envelopes = [pickle.loads(data) for data, _ in jobs]
    assert envelopes[0]["new"] and envelopes[1]["new"] == {}, [len(e["new"]) for e in envelopes]
    sent = [cond["control"] for conds in jobs[0][1]["conds"].values() for cond in conds]
    assert len(sent) == 2 and sent[0] is sent[1] and sent[0] is not second
    assert isinstance(sent[0].previous_controlnet.vae, PublishedVAE) and sent[0].vae is None
    assert isinstance(sent[0].previous_controlnet.preprocess_image, ClassDefault)
    modules = (first.control_model, second.control_model, vae.first_stage_model)
    weights = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    from comfy.sampler_helpers import convert_cond  # the guider's form of the conds

    assert controls_model_bytes({"positive": convert_cond(pos_c), "negative": convert_cond(neg_c)}) == weights  # once each


def test_the_workers_keep_a_controlnet_loaded_between_prompts(comfyui_path, pack_nodes, pool_cleanup, monkeypatch):
    """As ComfyUI keeps a ControlNet loaded between prompts in-process, the workers keep the
    model of the last prompt's ControlNets: a copy of the same ControlNet (another strength and
    hint, as Apply ControlNet makes) gets it, with its own strength; the same ControlNet after an
    in-place change of its weights, another ControlNet, or a prompt without one, does not.
    Every output equals in-process sampling."""
    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.pool import sent_once
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    monkeypatch.setattr(sent_once, "MIN_BYTES", 0)  # nothing inline: what stays the same goes as tokens
    patcher, pos, neg, latent = sampling_inputs("flux", latent=dict(height=6, width=10))
    g = torch.Generator().manual_seed(5)
    hints = [torch.rand(1, 3, 6 * 8, 10 * 8, generator=g) for _ in range(2)]
    loaded = comfy_models.flux_controlnet(seed=6)
    other = comfy_models.flux_controlnet(seed=7)
    prompts = [  # (ControlNet applied, what the workers should say about its model)
        (loaded.copy().set_cond_hint(hints[0], 1.0), "0 kept from the last prompt (0 still loaded), 1 new"),
        (loaded.copy().set_cond_hint(hints[1], 0.5, (0.0, 0.7)), "1 kept from the last prompt (1 still loaded), 0 new"),
        ("scale the weights in place", None),
        (loaded.copy().set_cond_hint(hints[1], 0.5, (0.0, 0.7)), "0 kept from the last prompt (0 still loaded), 1 new"),
        (other.copy().set_cond_hint(hints[0], 1.0), "0 kept from the last prompt (0 still loaded), 1 new"),
        (None, None),
        (other.copy().set_cond_hint(hints[1], 0.8), "0 kept from the last prompt (0 still loaded), 1 new"),
    ]
    model = _cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)
    outputs = []
    for control, expected in prompts:
        if isinstance(control, str):  # what a custom node could do to a loaded ControlNet's weights
            with torch.inference_mode():
                next(loaded.control_model.parameters()).mul_(1.5)
            continue
        conds = _with_control(pos, control) if control is not None else pos
        plain = comfy_models.sample(patcher, conds, neg, latent, steps=2, cfg=1.0)
        parallel = comfy_models.sample(model, conds, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(parallel).all() and (parallel - plain).abs().max().item() < TOL
        lines = [line for rank in pool_sampling.last_run_logs for line in rank if "ControlNet models" in line]
        if expected is None:
            assert lines == []
        else:
            assert len(lines) == 2 and all(expected in line for line in lines), lines
        outputs.append(parallel)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3  # the kept model ran with the second prompt's strength


def test_controlnets_with_two_vaes_are_refused_before_any_worker_runs(comfyui_path, pack_nodes, pool_cleanup):
    """The workers keep one VAE in /dev/shm: a prompt whose ControlNets encode their hints
    with two different VAEs is refused with a message saying what to change."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs
    from comfy_para_attn.testing.vae_models import tiny_comfy_vae

    patcher, pos, neg, latent = sampling_inputs("flux", latent=dict(height=6, width=10))
    hint = torch.rand(1, 3, 6 * 8, 10 * 8, generator=torch.Generator().manual_seed(5))
    controls = []
    for seed in (4, 8):
        vae = tiny_comfy_vae("flux", seed=seed)
        controls.append(comfy_models.flux_controlnet(vae=vae, seed=seed).copy().set_cond_hint(hint, 0.5, vae=vae))
    controls[1].set_previous_controlnet(controls[0])
    with pytest.raises(Exception, match="one VAE per prompt; give every ControlNet of this prompt the same VAE"):
        comfy_models.sample(_cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), _with_control(pos, controls[1]),
                            neg, latent, steps=2, cfg=1.0)


def test_fp8_quantize_is_applied_in_the_workers_as_in_process(comfyui_path, pack_nodes, pool_cleanup):
    """FP8 Quantize -> Context Parallel: the workers quantize their own copy of the weights
    from the settings (on CPU torchao's weight-only fp8; int8 modulation weights when asked)
    and sample what in-process FP8 sampling does: each setting's own output, not the plain
    model's nor the other setting's."""
    pytest.importorskip("torchao")
    from comfy_para_attn.adapters.comfy.fp8 import apply_fp8
    from comfy_para_attn.quant import FP8Settings
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    outputs = {"plain": comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=1.0)}
    for modulation in ("original", "int8"):
        quantized = apply_fp8(patcher, FP8Settings(modulation=modulation))
        in_process = comfy_models.sample(quantized, pos, neg, latent, steps=3, cfg=1.0)
        parallel = comfy_models.sample(_cp(pack_nodes, quantized), pos, neg, latent, steps=3, cfg=1.0)
        assert torch.isfinite(parallel).all() and in_process.abs().mean() > 1e-3
        assert (parallel - in_process).abs().max().item() < TOL, modulation
        outputs[modulation] = in_process
    assert (outputs["original"] - outputs["plain"]).abs().max().item() > 10 * TOL  # fp8 shows in the output
    assert (outputs["int8"] - outputs["original"]).abs().max().item() > 10 * TOL  # and so do int8 modulation weights


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
    parallel = run(_cp(pack_nodes, patcher))
    assert torch.isfinite(parallel).all() and in_process.abs().mean() > 1e-3
    assert (parallel - in_process).abs().max().item() < TOL
    assert current_pool() is not None


def _comfy_extras(comfyui_path, name):
    """A comfy_extras module loaded as ComfyUI loads it: named by its file path."""
    import importlib.util
    import os
    import sys

    path = os.path.join(comfyui_path, "comfy_extras", f"{name}.py")
    module_name = os.path.splitext(path)[0]
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


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
    cls = getattr(_comfy_extras(comfyui_path, module), cls_name)
    patcher, pos, neg, latent = sampling_inputs("wan")
    out = cls.execute(patcher, **inputs) if hasattr(cls, "execute") else getattr(cls(), cls.FUNCTION)(patcher, **inputs)
    patched = out.result[0] if hasattr(out, "result") else out[0]
    assert patched.model_options != patcher.model_options
    without = comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=3.0)
    plain = comfy_models.sample(patched, pos, neg, latent, steps=3, cfg=3.0)
    assert (plain - without).abs().max() > 1e-3  # the node changes the result
    parallel = comfy_models.sample(_cp(pack_nodes, patched, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                                   steps=3, cfg=3.0)
    assert torch.isfinite(parallel).all()
    err = (parallel - plain).abs().max().item()
    assert err < TOL, f"{node}: max abs err {err:.3g}"


@pytest.mark.parametrize("family, layers", [("wan", dict(double_layers="0,2")), ("flux", dict(single_layers="1"))])
def test_skip_layer_guidance_on_the_first_or_last_block(comfyui_path, pack_nodes, pool_cleanup, family, layers):
    """Skip Layer Guidance replaces the blocks it skips in its extra model call's options: on
    the first or last block that removed the patch that shards or gathers the tokens (a
    shape error in the workers); ours are put back around its skip for that call."""
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    slg = _comfy_extras(comfyui_path, "nodes_slg").SkipLayerGuidanceDiT
    patcher, pos, neg, latent = sampling_inputs(family)
    inputs = {**dict(scale=3.0, start_percent=0.0, end_percent=1.0, double_layers="", single_layers=""), **layers}
    skipping = slg.execute(patcher, **inputs).result[0]
    plain = comfy_models.sample(skipping, pos, neg, latent, steps=3, cfg=3.0)
    assert (plain - comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=3.0)).abs().max() > 1e-3
    for layout in (dict(ulysses_degree=2), dict(ulysses_degree=1, ring_degree=2)):
        out = comfy_models.sample(_cp(pack_nodes, skipping, **layout), pos, neg, latent, steps=3, cfg=3.0)
        err = (out - plain).abs().max().item()
        assert torch.isfinite(out).all() and err < TOL, f"{layout}: max abs err {err:.3g}"


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
    out = comfy_models.sample(_cp(pack_nodes, wrapped, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                              steps=2, cfg=3.0)
    assert torch.isfinite(out).all() and (out - plain).abs().max() < TOL


def test_a_dual_model_guider_is_refused_with_what_to_change(comfyui_path, pack_nodes, pool_cleanup):
    """Newer ComfyUI's dual-model guider (the negative on a second model) under Context
    Parallel: a clear refusal before any worker runs (it failed on pickling a class of that
    model's layers, naming ComfyUI internals)."""
    import comfy.samplers

    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    extras = _comfy_extras(comfyui_path, "nodes_custom_sampler")
    if not hasattr(extras, "Guider_DualModel"):
        pytest.skip("this ComfyUI has no dual-model guider")
    patcher, pos, neg, latent = sampling_inputs("wan")
    guider = extras.Guider_DualModel(_cp(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), patcher.clone())
    guider.set_conds(pos, neg)
    guider.set_cfg(3.0)
    before = current_pool()
    with pytest.raises(ValueError, match="does not support a guider with a second model"):
        guider.sample(latent, latent, comfy.samplers.sampler_object("euler"), torch.tensor([1.0, 0.5, 0.0]), seed=0)
    assert current_pool() is before


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
    parallel = comfy_models.sample(_cp(pack_nodes, model), pos, neg, latent, steps=2, cfg=3.0)
    assert torch.isfinite(parallel).all() and in_process.abs().mean() > 1e-3
    assert (parallel - in_process).abs().max().item() < TOL


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


def test_a_published_model_file_removed_by_another_process_is_written_again(comfyui_path, pack_nodes, pool_cleanup,
                                                                          caplog):
    """Another ComfyUI sharing /dev/shm from another PID namespace can take our publish
    directory for a dead controller's and remove it. The cached handle then failed every
    new pool until the model was freed; now the weights are written again."""
    import shutil
    from pathlib import Path

    from comfy_para_attn.adapters.comfy import published
    from comfy_para_attn.pool import shutdown_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    model = _cp(pack_nodes, patcher)
    first = comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0)
    fingerprint = published._fingerprints[patcher.model.diffusion_model]
    path = Path(published._published[fingerprint].path)
    shutdown_pool()  # a new pool maps the file again (a live one may hold the model already)
    shutil.rmtree(path.parent)
    with caplog.at_level(logging.WARNING):
        again = comfy_models.sample(model, pos, neg, latent, steps=2, cfg=1.0)
    assert "shared-memory file" in caplog.text and "writing it again" in caplog.text
    assert torch.equal(again, first) and Path(published._published[fingerprint].path).exists()


def test_a_pool_start_past_its_time_limit_says_how_to_give_it_more(comfyui_path, pool_cleanup, monkeypatch,
                                                                   tmp_path):
    """The start limit of ComfyUI's pool comes from COMFY_PARA_ATTN_POOL_START_TIMEOUT_S; a
    start that passes it says so (it named no setting a user could change)."""
    import os

    from comfy_para_attn.adapters.comfy import comfy_pool
    from comfy_para_attn.pool import PoolStartError, shutdown_pool

    shutdown_pool()
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(3)\n")  # every worker starts 3 s late
    python_path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), python_path])))
    monkeypatch.setenv(comfy_pool.START_TIMEOUT_ENV, "1")
    monkeypatch.setattr("comfy_para_attn.pool.controller.INIT_MIN_TIMEOUT_S", 0.001)  # the init's floor too
    with pytest.raises(PoolStartError) as info:
        comfy_pool.comfy_pool(2, "cpu")
    assert f"set {comfy_pool.START_TIMEOUT_ENV} (seconds, now 1)" in str(info.value)
    monkeypatch.delenv(comfy_pool.START_TIMEOUT_ENV)
    monkeypatch.setenv("PYTHONPATH", python_path) if python_path else monkeypatch.delenv("PYTHONPATH")
    assert comfy_pool.comfy_pool(2, "cpu").alive
