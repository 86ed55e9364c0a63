"""The Context Parallel node in real ComfyUI: sampling runs in a pool of 2 CPU worker
processes (gloo) and equals in-process sampling (comfyui tier, fp32, tiny random models):
model families, samplers, previews, LoRA, FP8 and Compile in the workers."""

import logging
import pickle

import pytest
import torch

from comfy_para_attn.testing.comfy_pool_checks import POOL_TOL, context_parallel, with_control


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
        parallel = comfy_models.sample(context_parallel(pack_nodes, patcher, **layout), pos, neg, latent, steps=4, **case)
        assert torch.isfinite(parallel).all()
        assert plain.abs().mean() > 1e-3
        err = (parallel - plain).abs().max().item()
        assert err < POOL_TOL, f"{family} {case} {layout}: max abs err {err:.3g}"


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_an_area_condition_too_small_to_split_runs_whole_on_every_rank(comfyui_path, pack_nodes, pool_cleanup, family):
    """ConditioningSetArea cropped at the image's edge makes a model call of one image token:
    every rank runs that call whole (as in-process), the full-image calls still split, and the
    pool stays up. It used to fail inside the workers and take the pool down with it."""
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs(family)
    corner = [[t, {**extra, "area": (8, 8, latent.shape[-2] - 1, latent.shape[-1] - 1), "strength": 1.0,
                   "set_area_to_bounds": False}] for t, extra in pos]  # 8x8 latent area, 1x1 left inside
    positive = pos + corner
    plain = comfy_models.sample(patcher, positive, neg, latent, steps=3, cfg=2.0)
    assert (plain - comfy_models.sample(patcher, pos, neg, latent, steps=3, cfg=2.0)).abs().max() > 1e-3
    pids = None
    for layout in (dict(ulysses_degree=1, ring_degree=2), dict(ulysses_degree=2)):
        parallel = comfy_models.sample(context_parallel(pack_nodes, patcher, **layout), positive, neg, latent,
                                       steps=3, cfg=2.0)
        assert torch.isfinite(parallel).all()
        err = (parallel - plain).abs().max().item()
        assert err < POOL_TOL, f"{family} {layout}: max abs err {err:.3g}"
        pids = pids or current_pool().pids
        assert current_pool().pids == pids, "the pool was restarted"


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
    parallel = comfy_models.sample(context_parallel(pack_nodes, model, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                                   steps=4, cfg=3.0, sampler_name=sampler_name)
    assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
    err = (parallel - plain).abs().max().item()
    assert err < POOL_TOL, f"{sampler_name}: max abs err {err:.3g}"


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
    parallel = comfy_models.sample(context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), pos, neg, latent,
                                   steps=3, cfg=1.0)
    assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
    assert (plain - without).abs().max() > 1e-2  # the first frame's own modulation matters
    err = (parallel - plain).abs().max().item()
    assert err < POOL_TOL, f"max abs err {err:.3g}"


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
        parallel = comfy_models.sample(context_parallel(pack_nodes, patcher), pos, neg, latent_image, steps=4, **case)
        assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
        err = (parallel - plain).abs().max().item()
        assert err < POOL_TOL, f"{list(case)}: max abs err {err:.3g}"


def test_workers_profile_the_prompts_of_the_asked_length(comfyui_path, pack_nodes, pool_cleanup, monkeypatch):
    """PARA_ATTN_PROFILE=N (in the environment the pool starts with) makes every rank profile
    the prompts of N steps and log a summary; other prompts run unprofiled."""
    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.pool import shutdown_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("flux")
    model = context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)
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
    for name, model in (("plain", patcher), ("parallel", context_parallel(pack_nodes, patcher))):
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
    assert (last_parallel - last_plain).abs().max().item() < POOL_TOL


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
    parallel = comfy_models.sample(context_parallel(pack_nodes, compiled), pos, neg, latent, steps=3, cfg=1.0)
    weight_bytes = sum(p.numel() * p.element_size() for p in patcher.model.diffusion_model.parameters())
    sizes = [len(data) for data, _ in jobs]
    assert jobs and all("model_options" in payload for _, payload in jobs)
    assert max(sizes) < weight_bytes / 10, (sizes, weight_bytes)
    assert torch.isfinite(parallel).all() and plain.abs().mean() > 1e-3
    assert (parallel - plain).abs().max().item() < POOL_TOL


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
        parallel = comfy_models.sample(context_parallel(pack_nodes, with_lora), pos, neg, latent, steps=3, cfg=1.0, seed=seed)
        assert torch.isfinite(parallel).all()
        assert (parallel - plain).abs().max().item() < POOL_TOL, (strength, seed)
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
    parallel = cm.sample(context_parallel(pack_nodes, model, ulysses_degree=1, ring_degree=2), positive, [], latent, steps=2, cfg=1.0)
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
    parallel = context_parallel(pack_nodes, patcher)
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
    assert err < POOL_TOL, f"max abs err {err:.3g}"


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
        out = cm.sample(context_parallel(pack_nodes, patcher, **layout), positive, negative, latent, steps=2, cfg=3.0)
        assert torch.isfinite(out).all() and plain.abs().mean() > 0.1
        err = (out - plain).abs().max().item()
        assert err < POOL_TOL, f"{layout}: max abs err {err:.3g}"
    if family == "flux":  # a ControlNet's residual after the gathering (double) block meets the whole image
        hint = torch.rand(1, 3, latent.shape[-2] * 8, latent.shape[-1] * 8, generator=torch.Generator().manual_seed(5))
        control = cm.flux_controlnet(seed=6, depth=3, depth_single_blocks=0).copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
        positive, negative = with_control(positive, control), with_control(negative, control)
        plain_control = cm.sample(patcher, positive, negative, latent, steps=2, cfg=3.0)
        assert (plain_control - plain).abs().max() > 1e-2  # the ControlNet steers the result
        out = cm.sample(context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), positive, negative, latent,
                        steps=2, cfg=3.0)
        err = (out - plain_control).abs().max().item()
        assert torch.isfinite(out).all() and err < POOL_TOL, f"ControlNet: max abs err {err:.3g}"


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
        parallel = comfy_models.sample(context_parallel(pack_nodes, quantized), pos, neg, latent, steps=3, cfg=1.0)
        assert torch.isfinite(parallel).all() and in_process.abs().mean() > 1e-3
        assert (parallel - in_process).abs().max().item() < POOL_TOL, modulation
        outputs[modulation] = in_process
    assert (outputs["original"] - outputs["plain"]).abs().max().item() > 10 * POOL_TOL  # fp8 shows in the output
    assert (outputs["int8"] - outputs["original"]).abs().max().item() > 10 * POOL_TOL  # and so do int8 modulation weights
