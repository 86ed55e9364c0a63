"""ControlNet under the Context Parallel pool (comfyui tier, 2 CPU ranks): FLUX ControlNets
sample as in-process, travel once and stay loaded; what cannot be sharded is refused."""

import pickle

import pytest
import torch

from comfy_para_attn.testing.comfy_pool_checks import POOL_TOL, context_parallel, with_control


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
    pos_c, neg_c = with_control(pos, control), with_control(neg, control)
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
        parallel = comfy_models.sample(context_parallel(pack_nodes, patcher, **layout), pos_c, neg_c, latent, steps=3, **case)
        assert torch.isfinite(parallel).all()
        err = (parallel - plain).abs().max().item()
        assert err < POOL_TOL, f"{encoder} {case} {layout}: max abs err {err:.3g}"


def test_a_controlnet_on_a_video_model_is_refused_before_any_worker_runs(comfyui_path, pack_nodes, pool_cleanup):
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs("hunyuan_video")
    control = comfy_models.flux_controlnet(seed=6)
    with pytest.raises(Exception, match="ControlNet under Context Parallel works with FLUX models only"):
        comfy_models.sample(context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), with_control(pos, control),
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
    pos_c, neg_c = with_control(pos, second), with_control(neg, second)
    plain = comfy_models.sample(patcher, pos_c, neg_c, latent, steps=3, cfg=2.0)
    import comfy.model_management as mm

    def loaded_here():  # ControlNet models ComfyUI holds loaded in this process
        return [m for m in mm.current_loaded_models if m.model in (first.control_model_wrapped,
                                                                   second.control_model_wrapped)]

    assert len(loaded_here()) == 2  # the in-process run left them loaded
    jobs = record_sampling_jobs(monkeypatch)
    model = context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)
    parallel = comfy_models.sample(model, pos_c, neg_c, latent, steps=3, cfg=2.0)
    assert torch.isfinite(parallel).all() and (parallel - plain).abs().max().item() < POOL_TOL
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
    model = context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2)
    outputs = []
    for control, expected in prompts:
        if isinstance(control, str):  # what a custom node could do to a loaded ControlNet's weights
            with torch.inference_mode():
                next(loaded.control_model.parameters()).mul_(1.5)
            continue
        conds = with_control(pos, control) if control is not None else pos
        plain = comfy_models.sample(patcher, conds, neg, latent, steps=2, cfg=1.0)
        parallel = comfy_models.sample(model, conds, neg, latent, steps=2, cfg=1.0)
        assert torch.isfinite(parallel).all() and (parallel - plain).abs().max().item() < POOL_TOL
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
        comfy_models.sample(context_parallel(pack_nodes, patcher, ulysses_degree=1, ring_degree=2), with_control(pos, controls[1]),
                            neg, latent, steps=2, cfg=1.0)
