"""Diffusers tier: First Block Cache on tiny diffusers Flux / HunyuanVideo transformers (CPU)."""
import pytest
import torch

pytest.importorskip("diffusers")

from comfy_para_attn.adapters.diffusers.cache import apply_cache, remove_cache, reset_cache  # noqa: E402
from comfy_para_attn.testing import diffusers_models as dm  # noqa: E402

# family -> (builder, inputs, schedule in the model's timestep units, units per sigma)
FAMILIES = {
    "flux": (dm.tiny_flux, dm.flux_inputs, torch.linspace(1.0, 0.1, 8), 1.0),
    "hunyuan_video": (dm.tiny_hunyuan_video, dm.hunyuan_video_inputs, torch.linspace(1000, 100, 8), 1000.0),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request):
    build, inputs, schedule, scale = FAMILIES[request.param]
    model, x = build(), inputs()
    plain = dm.denoise(model, x, schedule, scale=scale)
    return request.param, model, x, schedule, scale, plain


@pytest.mark.parametrize("threshold", [0.0, 1e-9])
def test_no_reuse_is_bit_identical(setup, threshold):
    _, model, x, schedule, scale, plain = setup
    run = apply_cache(model, threshold)
    try:
        out = dm.denoise(model, x, schedule, scale=scale)
    finally:
        remove_cache(model)
    assert torch.isfinite(plain).all() and plain.abs().mean() > 0.1
    assert torch.equal(out, plain) and run.cache.hits == 0
    assert run.cache.calls == (0 if threshold == 0 else len(schedule))


def test_high_threshold_reuses_and_remove_restores(setup):
    _, model, x, schedule, scale, plain = setup
    run = apply_cache(model, 1.0)
    out = dm.denoise(model, x, schedule, scale=scale)
    assert run.cache.hits > 0 and run.cache.history[0] is False
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    reset_cache(model)
    assert run.cache.buffers == 0
    remove_cache(model)
    assert all("forward" not in b.__dict__ for b in model.transformer_blocks)
    assert torch.equal(dm.denoise(model, x, schedule, scale=scale), plain)


def test_applying_again_replaces_and_diffusers_block_hooks_survive_removal():
    """A block with a diffusers hook (HookRegistry wraps its forward): the hook runs under the
    cache and again after remove_cache; applying twice replaces the first cache (it failed on
    the first one's forward)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import ModelHook

    model, x, schedule = dm.tiny_flux(), dm.flux_inputs(), torch.linspace(1.0, 0.1, 3)
    calls = []

    class Probe(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(1)
            return args, kwargs

    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0]).register_hook(Probe(), "probe")
    plain = dm.denoise(model, x, schedule)
    assert len(calls) == 3
    apply_cache(model, 0.5)
    run = apply_cache(model, 1e-9)  # replaces the first; never reuses
    assert torch.equal(dm.denoise(model, x, schedule), plain) and run.cache.calls == 3 and len(calls) == 6
    remove_cache(model)
    assert torch.equal(dm.denoise(model, x, schedule), plain) and len(calls) == 9


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hit_error_vanishes_with_the_step(family):
    """fp64: a hit's error against the plain model shrinks linearly with the timestep change
    (a tail restored on the wrong stream would leave an O(1) error)."""
    build, inputs, _, scale = FAMILIES[family]
    model, x = build(dtype=torch.float64), inputs(dtype=torch.float64)
    errors = []
    for step in (1e-4, 1e-5, 1e-6):
        run = apply_cache(model, 0.5)
        with torch.no_grad():
            for t in (1.0, 1.0 - step):
                out = model(**x, timestep=torch.tensor([t * scale], dtype=torch.float64), return_dict=False)[0]
            remove_cache(model)
            plain = model(**x, timestep=torch.tensor([(1.0 - step) * scale], dtype=torch.float64),
                          return_dict=False)[0]
        assert run.cache.history == [False, True] and plain.abs().mean() > 0.1
        errors.append((out - plain).abs().max().item())
    assert errors[0] / errors[1] == pytest.approx(10, rel=0.3)
    assert errors[1] / errors[2] == pytest.approx(10, rel=0.3)


def test_calls_at_one_timestep_are_parts_of_one_step():
    """A pipeline running cond and uncond as two calls per step: one decision per step."""
    build, inputs, schedule, scale = FAMILIES["flux"]
    model, cond, uncond = build(), inputs(seed=0), inputs(seed=1)
    run = apply_cache(model, 1.0)
    x = cond["hidden_states"]
    with torch.no_grad():
        for i, t in enumerate(schedule):
            ts = torch.tensor([float(t)])
            v_c = model(**dict(cond, hidden_states=x), timestep=ts, return_dict=False)[0]
            v_u = model(**dict(uncond, hidden_states=x), timestep=ts, return_dict=False)[0]
            x = x - 0.1 * (v_c + 2 * (v_c - v_u))
    remove_cache(model)
    h = run.cache.history
    assert len(h) == 2 * len(schedule) and h[0::2] == h[1::2] and any(h)
    assert torch.isfinite(x).all()


def test_reduce_sum_and_errors():
    build, inputs, schedule, scale = FAMILIES["flux"]
    model, x = build(), inputs()
    seen = []
    apply_cache(model, 1.0, reduce_sum=lambda t: seen.append(t) or t)
    dm.denoise(model, x, schedule[:3], scale=scale)
    remove_cache(model)
    assert len(seen) == 3
    with pytest.raises(ValueError, match="FluxTransformer2DModel and HunyuanVideoTransformer3DModel"):
        apply_cache(torch.nn.Linear(2, 2), 0.1)
