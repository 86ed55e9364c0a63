"""ComfyUI tier: First Block Cache on tiny Flux / HunyuanVideo / Wan models built with
ComfyUI's own classes, sampled through ComfyUI's real sampling (comfy.sample.sample) on CPU
in fp32. References are the same model sampled the plain way in the same process."""
import logging

import pytest
import torch

from comfy_para_attn.cache import FirstBlockCacheSettings as Settings

FAMILIES = ["flux", "hunyuan_video", "wan"]
STEPS = 8


@pytest.fixture(scope="module")
def fbc(comfyui_path):
    from comfy_para_attn.adapters.comfy import first_block_cache

    return first_block_cache


@pytest.fixture(scope="module")
def setups(cm):
    """family -> (patcher, positive, negative, latent, plain output)."""
    out = {}
    for family in FAMILIES:
        model = cm.build(family)
        pos, neg = cm.conditioning(model, seed=1), cm.conditioning(model, seed=2)
        latent = torch.zeros(cm.latent_shape(family))
        out[family] = (model, pos, neg, latent, cm.sample(model, pos, neg, latent, steps=STEPS))
    return out


@pytest.fixture
def runs(fbc, monkeypatch):
    """Every FirstBlockCacheRun created by the OUTER_SAMPLE wrapper, with the sigma per call."""
    created = []

    class Recording(fbc.FirstBlockCacheRun):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sigmas = []
            created.append(self)

        def first_block(self, args, original, block_type):
            self.sigmas.append(float(args["transformer_options"]["sigmas"].max()))
            return super().first_block(args, original, block_type)

    monkeypatch.setattr(fbc, "FirstBlockCacheRun", Recording)
    return created


def sample_with(cm, fbc, setup, settings, **kwargs):
    model, pos, neg, latent, _ = setup
    return cm.sample(fbc.apply_first_block_cache(model, settings), pos, neg, latent, steps=STEPS, **kwargs)


@pytest.mark.comfyui
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("threshold", [0.0, 1e-9])
def test_no_reuse_is_bit_identical(cm, fbc, setups, runs, family, threshold):
    """Threshold 0 (off) and a threshold that never hits (full bookkeeping) equal plain."""
    plain = setups[family][4]
    out = sample_with(cm, fbc, setups[family], Settings(threshold))
    assert torch.isfinite(plain).all() and plain.abs().mean() > 0.1
    assert torch.equal(out, plain)
    assert runs[-1].cache.calls == STEPS and runs[-1].cache.hits == 0


@pytest.mark.comfyui
@pytest.mark.parametrize("family", FAMILIES)
def test_high_threshold_reuses_and_logs(cm, fbc, setups, runs, family, caplog):
    plain = setups[family][4]
    with caplog.at_level(logging.INFO):
        out = sample_with(cm, fbc, setups[family], Settings(1.0))
    run = runs[-1]
    assert 0 < run.cache.hits < STEPS and run.cache.history[0] is False
    assert torch.isfinite(out).all() and not torch.equal(out, plain)
    assert f"First Block Cache: reused {run.cache.hits} of {STEPS} model calls (threshold 1)" in caplog.text
    assert run.cache.buffers == 0 and run.current is None  # freed at the end of the run


@pytest.mark.comfyui
@pytest.mark.parametrize("family", FAMILIES)
def test_reused_step_matches_plain_when_inputs_barely_change(cm, fbc, setups, runs, family):
    """Sigmas a hair apart: every step after the first reuses, and the output equals the plain
    model's within float tolerance (the cached tail is put back on the right stream/tokens)."""
    model, pos, neg, latent, _ = setups[family]
    sigmas = torch.tensor([1.0, 0.999999, 0.999998, 0.999997, 0.0])
    plain = cm.sample(model, pos, neg, latent, sigmas=sigmas)
    out = sample_with(cm, fbc, setups[family], Settings(0.05), sigmas=sigmas)
    assert runs[-1].cache.history == [False, True, True, True]
    assert torch.isfinite(out).all() and plain.abs().mean() > 0.1
    torch.testing.assert_close(out, plain, atol=1e-2, rtol=1e-2)


FP32_STEPS = {"flux": (1e-4, 1e-5, 1e-6), "hunyuan_video": (1e-3, 1e-4, 1e-5), "wan": (1e-2, 1e-3, 1e-4)}


def _rope_runs_in_float64() -> bool:
    """Newer ComfyUI applies rope through comfy_kitchen's kernels, which take at most fp32."""
    from comfy.ldm.flux.math import apply_rope

    x = torch.ones(1, 1, 2, 4, dtype=torch.float64)
    try:
        apply_rope(x, x, torch.ones(1, 1, 2, 2, 2, 2, dtype=torch.float64))
    except Exception:
        return False
    return True


@pytest.mark.comfyui
@pytest.mark.parametrize("family", FAMILIES)
def test_hit_error_vanishes_with_the_step(cm, fbc, family):
    """Direct model calls (fp64; Wan runs its patch embedding in fp32, so fp32 and larger
    steps there): on a hit the error against the plain model is the tail's change
    between steps, so it shrinks linearly with the sigma step. A tail put back on the wrong
    stream or tokens would leave an O(1) error."""
    dtype = torch.float64 if family != "wan" and _rope_runs_in_float64() else torch.float32
    # Steps where the error is still linear in the step and above the dtype's rounding.
    steps = (1e-4, 1e-5, 1e-6) if dtype == torch.float64 else FP32_STEPS[family]
    model = cm.build(family, dtype=dtype)
    patched = fbc.apply_first_block_cache(model, Settings(0.5))
    dm = model.model.diffusion_model
    x = torch.randn(cm.latent_shape(family), generator=torch.Generator().manual_seed(0), dtype=dtype)
    ctx, extra = cm.conditioning(model, seed=1)[0]
    kw = {} if family == "wan" else dict(y=extra["pooled_output"].to(dtype), guidance=torch.tensor([3.5]))
    errors = []
    for step in steps:
        run = fbc.FirstBlockCacheRun(Settings(0.5), text_first=fbc.text_first(model))
        for sigma in (1.0, 1.0 - step):
            to = dict(patched.model_options["transformer_options"], sigmas=torch.tensor([sigma]),
                      cond_or_uncond=[0], uuids=["c"], **{fbc.STATE_KEY: run})
            out = dm(x, torch.tensor([sigma]), ctx.to(dtype), transformer_options=to, **kw)
        plain = dm(x, torch.tensor([sigma]), ctx.to(dtype), **kw)
        assert run.cache.history == [False, True] and plain.abs().mean() > 0.1
        errors.append((out - plain).abs().max().item())
    assert errors[2] < 1e-3 * max(1.0, plain.abs().max().item())
    assert errors[0] / errors[1] == pytest.approx(10, rel=0.3) and errors[1] / errors[2] == pytest.approx(10, rel=0.3)


@pytest.mark.comfyui
def test_start_end_percent_are_honoured(cm, fbc, setups, runs):
    setup = setups["flux"]
    sample_with(cm, fbc, setup, Settings(1.0, start_percent=0.3, end_percent=0.7))
    run = runs[-1]
    inside = [run.end_sigma <= s <= run.start_sigma for s in run.sigmas]
    assert 0 < sum(inside) < STEPS
    assert any(run.cache.history)
    assert all(inside[i] for i, hit in enumerate(run.cache.history) if hit)


@pytest.mark.comfyui
@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_joint_sequence_order_follows_the_running_comfyui(cm, family):
    """FLUX's joint sequence is [text, image]; HunyuanVideo's is [image, text] in ComfyUI 0.3.x
    and [text, image] in newer ComfyUI. Read from what the blocks get: text tokens sit at
    position 0 (an identity rotation in the rope `pe`), image tokens away from it, so the
    sequence ends in an image token exactly when the text comes first."""
    from comfy_para_attn.adapters.comfy.patches import text_first

    model = cm.build(family)
    seen = []

    def capture(args, extra):
        seen.append(args["pe"])
        return extra["original_block"](args)

    observed = model.clone()
    observed.set_model_patch_replace(capture, "dit", "double_block", 0)
    cm.sample(observed, cm.conditioning(model, seed=1), [], torch.zeros(cm.latent_shape(family)), steps=1, cfg=1.0)
    last = seen[0][0, 0, -1]  # [dims, 2, 2] rotations of the last token
    identity = torch.eye(2).expand_as(last)
    assert text_first(model) == (not torch.allclose(last, identity))
    if family == "flux":
        assert text_first(model) and not text_first(cm.build("wan"))


def _update_in_place(args, extra):
    """A first block that adds its residual to its input tensor, as newer ComfyUI's Flux and
    HunyuanVideo blocks do (`img += ...`)."""
    out = dict(extra["original_block"](args))
    out["img"] = args["img"].copy_(out["img"])
    return out


@pytest.mark.comfyui
@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_a_first_block_that_updates_its_input_in_place_still_caches(cm, fbc, setups, runs, family):
    """The first block's residual is measured against a copy of its input: against the input
    itself, a block updating it in place gives a zero residual and the cache never reused."""
    model, pos, neg, latent, _ = setups[family]
    in_place = model.clone()
    in_place.set_model_patch_replace(_update_in_place, "dit", "double_block", 0)
    plain = cm.sample(in_place, pos, neg, latent, steps=STEPS)
    assert torch.equal(plain, setups[family][4])  # the same model
    sample_with(cm, fbc, (in_place, pos, neg, latent, plain), Settings(1.0))
    assert 0 < runs[-1].cache.hits < STEPS


@pytest.mark.comfyui
def test_max_consecutive_hits(cm, fbc, setups, runs):
    setup = setups["flux"]
    sample_with(cm, fbc, setup, Settings(1.0, max_consecutive_hits=1))
    capped = runs[-1].cache.history
    sample_with(cm, fbc, setup, Settings(1.0, max_consecutive_hits=-1))
    unlimited = runs[-1].cache.history
    pairs = lambda h: any(a and b for a, b in zip(h, h[1:]))  # noqa: E731
    assert any(capped) and not pairs(capped) and pairs(unlimited)
    out = sample_with(cm, fbc, setup, Settings(1.0, max_consecutive_hits=0))
    assert runs[-1].cache.hits == 0 and torch.equal(out, setup[4])


@pytest.mark.comfyui
def test_second_prompt_starts_clean(cm, fbc, setups, runs):
    model, pos, neg, latent, _ = setups["flux"]
    patched = fbc.apply_first_block_cache(model, Settings(1.0))
    first = cm.sample(patched, pos, neg, latent, steps=STEPS)
    second = cm.sample(patched, pos, neg, latent, steps=STEPS)
    assert len(runs) == 2 and runs[0] is not runs[1]
    assert runs[1].cache.history == runs[0].cache.history and runs[1].cache.history[0] is False
    assert torch.equal(first, second)
    assert fbc.STATE_KEY not in patched.model_options["transformer_options"]


@pytest.mark.comfyui
def test_cond_and_uncond_in_separate_calls_take_one_decision(cm, fbc, setups, runs):
    """Different text lengths keep ComfyUI from batching cond and uncond: two calls a step."""
    model, pos, _, latent, _ = setups["flux"]
    neg = cm.conditioning(model, seed=2, tokens=5)
    plain = cm.sample(model, pos, neg, latent, steps=STEPS)
    assert torch.equal(sample_with(cm, fbc, (model, pos, neg, latent, None), Settings(0.0)), plain)
    out = sample_with(cm, fbc, (model, pos, neg, latent, None), Settings(1.0))
    history, sigmas = runs[-1].cache.history, runs[-1].sigmas
    assert len(history) == 2 * STEPS and sigmas[0::2] == sigmas[1::2]
    assert history[0::2] == history[1::2] and any(history)
    assert torch.isfinite(out).all()


@pytest.mark.comfyui
@pytest.mark.parametrize("lora_first", [True, False])
def test_lora(cm, fbc, setups, runs, lora_first):
    model, pos, neg, latent, base = setups["flux"]
    lora = cm.random_lora(model)
    with_lora = cm.apply_lora(model, lora)
    plain = cm.sample(with_lora, pos, neg, latent, steps=STEPS)
    assert (plain - base).abs().max() > 1e-2  # the LoRA changes the result

    def patched(settings):
        if lora_first:
            return fbc.apply_first_block_cache(with_lora, settings)
        return cm.apply_lora(fbc.apply_first_block_cache(model, settings), lora)

    assert torch.equal(cm.sample(patched(Settings(1e-9)), pos, neg, latent, steps=STEPS), plain)
    out = cm.sample(patched(Settings(1.0)), pos, neg, latent, steps=STEPS)
    assert runs[-1].cache.hits > 0 and torch.isfinite(out).all()


@pytest.mark.comfyui
@pytest.mark.parametrize("foreign_first", [True, False])
def test_other_block_patches_keep_working(cm, fbc, setups, runs, foreign_first):
    """Another pack's patch on the first and last blocks is chained, not replaced."""
    model, pos, neg, latent, _ = setups["flux"]
    calls = []

    def foreign(args, extra):
        calls.append(1)
        out = extra["original_block"](args)
        return {k: v * 1.01 for k, v in out.items()}

    def add_foreign(m):
        m = m.clone()
        for key in (("double_block", 0), ("single_block", 1)):
            m.set_model_patch_replace(foreign, "dit", *key)
        return m

    plain = cm.sample(add_foreign(model), pos, neg, latent, steps=STEPS)
    n_plain = len(calls)
    settings = Settings(1e-9)
    both = (fbc.apply_first_block_cache(add_foreign(model), settings) if foreign_first
            else add_foreign(fbc.apply_first_block_cache(model, settings)))
    # foreign last: a later registration that does not chain replaces ours on those blocks (the
    # cache is off there); either way, without reuse the output is the foreign patch's alone
    out = cm.sample(both, pos, neg, latent, steps=STEPS)
    assert torch.isfinite(plain).all() and plain.abs().mean() > 0.1
    assert torch.equal(out, plain) and len(calls) == 2 * n_plain


@pytest.mark.comfyui
def test_context_parallel_hook_reduces_every_step(cm, fbc, setups, runs):
    """`transformer_options["para_attn_cp"].all_reduce_sum` is called once per deciding call
    and its sum decides: a second rank that adds nothing leaves the decisions unchanged, one
    that vetoes every step (it has no previous residual) turns every hit into a miss. The real
    collective between worker ranks: test_comfy_pool_cache.py."""
    model, pos, neg, latent, _ = setups["flux"]
    sample_with(cm, fbc, setups["flux"], Settings(1.0))
    expected = runs[-1].cache.history
    assert any(expected), expected

    def other_rank(adds):  # state on the class: model_options (and this object) are deep-copied
        return type("OtherRank", (), dict(seen=[], all_reduce_sum=lambda self, t: (
            self.seen.append(t.clone()), t + torch.tensor(adds))[1]))()

    for peer, history in ((other_rank([0.0, 0.0, 0.0]), expected), (other_rank([0.0, 0.0, 1.0]), [False] * len(expected))):
        m = model.clone()
        m.model_options["transformer_options"]["para_attn_cp"] = peer
        cm.sample(fbc.apply_first_block_cache(m, Settings(1.0)), pos, neg, latent, steps=STEPS)
        assert runs[-1].cache.history == history
        assert len(peer.seen) == STEPS and peer.seen[0].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.comfyui
def test_node_and_errors(cm, fbc, setups, comfyui_path):
    from comfy_para_attn.adapters.comfy.patches import block_counts, model_family
    import importlib.util
    from pathlib import Path

    # ComfyUI's own top-level `nodes` module shadows our `nodes` package here: load by path
    path = Path(__file__).resolve().parents[1] / "nodes" / "first_block_cache.py"
    spec = importlib.util.spec_from_file_location("para_attn_nodes_first_block_cache", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ParaAttnFirstBlockCache = module.ParaAttnFirstBlockCache

    model = setups["flux"][0]
    (patched,) = ParaAttnFirstBlockCache().apply(model, 0.12, 0.0, 1.0, -1)
    assert patched is not model
    assert patched.model_options["transformer_options"]["para_attn"]["first_block_cache"] == Settings(0.12)
    assert "para_attn" not in model.model_options["transformer_options"]
    again = fbc.apply_first_block_cache(patched, Settings(0.3))  # re-apply: settings replaced only
    assert repr(again.model_options["transformer_options"]["patches_replace"]["dit"]) == repr(
        patched.model_options["transformer_options"]["patches_replace"]["dit"])
    assert [model_family(setups[f][0]) for f in FAMILIES] == FAMILIES
    assert block_counts(setups["wan"][0]) == {"double_block": 3, "single_block": 0}

    class Other(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="Supported: FLUX .*HunyuanVideo.*Wan"):
        fbc.apply_first_block_cache(type("P", (), {"model": type("B", (), {"diffusion_model": Other()})()})(),
                                    Settings())


@pytest.mark.comfyui
def test_a_reused_step_with_a_controlnet_counts_its_residuals_once(cm, fbc):
    """ComfyUI adds ControlNet residuals in place after every block. A step whose input barely
    changed (sigmas 0.9, 0.9 - 1e-5) reuses the cache and must stay as close to the computed
    step as without a ControlNet; when the first block's output aliased the cached base, the
    double blocks' residuals were counted twice."""
    import comfy.sample
    import comfy.samplers

    model = cm.build("flux")
    pos, neg = cm.conditioning(model, seed=1), cm.conditioning(model, seed=2)
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    control = cm.flux_controlnet(seed=6).copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    latent = torch.zeros(cm.latent_shape("flux"))
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = torch.tensor([0.9, 0.9 - 1e-5, 0.0])

    def second_step(settings, positive):
        denoised = []
        comfy.sample.sample_custom(fbc.apply_first_block_cache(model, settings), noise, 1.0,
                                   comfy.samplers.sampler_object("euler"), sigmas, positive, neg, latent,
                                   callback=lambda step, x0, x, total: denoised.append(x0.clone()),
                                   disable_pbar=True, seed=0)
        return denoised[1]

    errors = {}
    for name, positive in (("plain", pos), ("controlnet", [[t, {**e, "control": control}] for t, e in pos])):
        computed, reused = second_step(Settings(0.0), positive), second_step(Settings(1.0), positive)
        assert torch.isfinite(reused).all() and computed.abs().mean() > 1e-3
        errors[name] = (reused - computed).abs().max().item()
    assert errors["controlnet"] < 10 * errors["plain"] + 1e-5, errors


@pytest.mark.comfyui
@pytest.mark.parametrize("family", ["flux", "wan"])
def test_skip_layer_guidance_calls_keep_their_own_tail(cm, fbc, setups, runs, family):
    """Skip Layer Guidance makes a second call a step with the same cond, uuids and sigma but
    some blocks skipped: its tail must not stand in for the full model's call (nor the other
    way round). With a negligible guidance scale the result must stay the cache-only one."""
    from comfy_extras.nodes_slg import SkipLayerGuidanceDiT

    from comfy_para_attn.adapters.comfy.patches import block_counts

    model, pos, neg, latent, _ = setups[family]
    single = block_counts(model).get("single_block", 0)
    layers = dict(double_layers="", single_layers="0") if single else dict(double_layers="1", single_layers="")

    def with_slg(m):
        out = SkipLayerGuidanceDiT.execute(m, scale=1e-6, start_percent=0.0, end_percent=1.0, **layers)
        return out.result[0] if hasattr(out, "result") else out[0]

    settings = Settings(0.9)
    cache_only = cm.sample(fbc.apply_first_block_cache(model, settings), pos, neg, latent, steps=STEPS, cfg=1.0)
    alone = runs[-1].cache
    both = cm.sample(with_slg(fbc.apply_first_block_cache(model, settings)), pos, neg, latent, steps=STEPS, cfg=1.0)
    assert alone.hits > 0 and runs[-1].cache.hits > 0
    rel = ((both - cache_only).abs().mean() / cache_only.abs().mean()).item()
    assert rel < 1e-4, f"{family}: FBC + SLG (scale 1e-6) differs from FBC alone by {rel:.3g}"


@pytest.mark.comfyui
def test_context_windows_each_keep_their_own_cache(cm, fbc, setups, runs):
    """ComfyUI's context windows call the model once per window at one sigma: each window is
    compared with its own last residual and reuses its own tail (one shared key made every
    window miss against the previous window, and a high threshold pasted one window's tail on
    another)."""
    import comfy.context_windows as cw

    def in_windows(m):
        m = m.clone()
        m.model_options["context_handler"] = cw.IndexListContextHandler(
            context_schedule=cw.get_matching_context_schedule(cw.ContextSchedules.STATIC_STANDARD),
            fuse_method=cw.get_matching_fuse_method(cw.ContextFuseMethods.PYRAMID),
            context_length=2, context_overlap=0, dim=2)
        cw.create_prepare_sampling_wrapper(m)
        return m

    model, pos, neg, _, _ = setups["wan"]
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(1, 16, 1, 8, 8, generator=g)
    latent = torch.cat([frames + 0.5 * i * torch.randn(frames.shape, generator=g) for i in range(4)], dim=2)
    sigmas = torch.tensor([1.0, 0.999999, 0.999998, 0.999997, 0.0])  # a correct cache reuses every later step
    plain = cm.sample(in_windows(model), pos, neg, latent, sigmas=sigmas)
    out = cm.sample(in_windows(fbc.apply_first_block_cache(model, Settings(0.05))), pos, neg, latent, sigmas=sigmas)
    assert runs[-1].cache.history == [False, False] + [True, True] * 3  # two windows a step
    assert torch.isfinite(out).all() and plain.abs().mean() > 0.1
    torch.testing.assert_close(out, plain, atol=1e-2, rtol=1e-2)
