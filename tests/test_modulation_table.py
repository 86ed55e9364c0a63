"""Compile Model's precomputed modulation (`comfy_para_attn.modulation_table` and its ComfyUI
adapter): the rows of every step from one pass over the weights equal the per-step
computation; ComfyUI's real sampling of a tiny FLUX with the table equals sampling without it
(euler on the schedule, heun between its sigmas, cfg > 1, a new prompt, the int8 modulation
layers of FP8 Quantize in either node order), and the layers run their matmul only when the
table is built. fp32 on CPU: a batched matmul sums like the per-row one up to ~1e-6."""
import pytest
import torch

from comfy_para_attn.compile import CompileSettings
from comfy_para_attn.modulation_table import ModulationTable, TableForward, detach, table_class


class Counting(torch.nn.Linear):
    """A linear layer that counts the calls of its own forward (the matmul)."""

    calls = 0

    def forward(self, x):
        Counting.calls += 1
        return super().forward(x)


def test_table_rows_equal_each_steps_own_computation():
    torch.manual_seed(0)
    layers = [Counting(16, 48), Counting(16, 24)]
    for layer in layers:
        layer.__class__ = table_class(Counting)
    inputs = torch.randn(5, 2, 16)  # 5 steps, 2 images
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])
    Counting.calls = 0
    table = ModulationTable([("a", layers[0]), ("b", layers[1])], inputs, sigmas)
    assert Counting.calls == 2 and table.rows.shape == (5, 2, 72) and table.nbytes == 5 * 2 * 72 * 4
    for step in (3, 0):
        assert not table.select(sigmas[step].repeat(2))
        table.attach()
        x = inputs[step][:, None, :]  # [batch, 1, dim], as FLUX's Modulation calls its layer
        for layer in layers:
            out = layer(x)
            detach([layer])
            expected = layer(x)
            table.attach()
            assert out.shape == expected.shape == (2, 1, layer.out_features)
            assert torch.isfinite(out).all() and expected.abs().mean() > 0.1
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    detach(layers)
    Counting.calls = 0
    layers[0](inputs[0])
    assert Counting.calls == 1  # detached: the layer's own matmul again
    assert table.select(torch.tensor([0.3, 0.42]))  # 0.42 is no step: reported
    torch.testing.assert_close(table.current[0], table.rows[3, 0])  # each image its own step


def test_a_kept_buffer_keeps_its_address_and_table_classes_compose():
    layer = torch.nn.Linear(8, 8)
    first = ModulationTable([("a", layer)], torch.randn(3, 1, 8), torch.rand(3))
    second = ModulationTable([("a", layer)], torch.randn(4, 1, 8), torch.rand(4), first.current)
    assert second.current is first.current  # a CUDA graph of a model call reads the rows there
    other = ModulationTable([("a", layer)], torch.randn(4, 2, 8), torch.rand(4), first.current)
    assert other.current is not first.current
    cls = table_class(torch.nn.Linear)
    assert issubclass(cls, TableForward) and table_class(cls) is cls and cls._para_attn_base is torch.nn.Linear


def test_settings_validate_the_mode():
    assert CompileSettings().modulation_table and not CompileSettings(modulation="per step").modulation_table
    assert not CompileSettings(scope="off").modulation_table
    with pytest.raises(ValueError, match="modulation must be one of"):
        CompileSettings(modulation="cached")


# ComfyUI tier -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flux(cm):
    return cm.use_sdpa_attention(cm.build("flux"))


def _compiled(model, modulation):
    from comfy_para_attn.adapters.comfy.compile import apply_compile

    return apply_compile(model, CompileSettings(backend="eager", modulation=modulation))


def _sample(cm, model, *, prompt_seed=1, cfg=1.0, sampler="euler", steps=4):
    positive = cm.conditioning(model, seed=prompt_seed)
    negative = cm.conditioning(model, seed=prompt_seed + 50) if cfg > 1 else []
    latent = torch.zeros(cm.latent_shape("flux", height=8, width=8))
    return cm.sample(model, positive, negative, latent, steps=steps, cfg=cfg, seed=5, sampler_name=sampler)


@pytest.fixture
def spy(monkeypatch):
    """Counts the tables built and the calls served from one."""
    from comfy_para_attn.adapters.comfy import modulation_table as adapter

    seen = {"built": 0, "served": 0, "calls": 0}
    build, enter = adapter.ModulationRows._build, adapter.ModulationRows.enter

    def counting_build(self, *args):
        seen["built"] += 1
        return build(self, *args)

    def counting_enter(self, *args):
        table = enter(self, *args)
        seen["calls"] += 1
        seen["served"] += table is not None
        return table

    monkeypatch.setattr(adapter.ModulationRows, "_build", counting_build)
    monkeypatch.setattr(adapter.ModulationRows, "enter", counting_enter)
    return seen


def _assert_same(out, ref):
    assert torch.isfinite(out).all() and ref.abs().mean() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler,cfg,calls,served", [("euler", 1.0, 4, 4), ("euler", 3.0, 4, 4),
                                                     ("heun", 1.0, 7, 7), ("dpm_2", 1.0, 7, 0),
                                                     ("dpmpp_2m_sde", 1.0, 4, 4), ("er_sde", 3.0, 4, 4)])
def test_sampling_with_the_table_equals_sampling_without(cm, flux, spy, sampler, cfg, calls, served):
    """euler: every call is on the schedule; cfg 3: cond and uncond in one batch, one table;
    heun: its second call of a step is at the next sigma, on the schedule too (both take the
    last step with one call); dpm_2 evaluates between sigmas: known, no table; the SDE samplers
    move a flow model's first sigma off 1.0 (offset_first_sigma_for_snr): a row of its own, not
    a second sampling."""
    ref = _sample(cm, _compiled(flux, "per step"), sampler=sampler, cfg=cfg)
    assert spy["calls"] == 0
    out = _sample(cm, _compiled(flux, "precomputed"), sampler=sampler, cfg=cfg)
    _assert_same(out, ref)
    assert spy["built"] == (1 if served else 0) and spy["served"] == served and spy["calls"] == calls


def test_a_sampler_found_between_sigmas_samples_again_without_the_table(cm, flux, spy, monkeypatch, caplog):
    """Were dpm_2 not known: its calls between sigmas are found at the end of the run, which
    is sampled again per step (the same image as without a table), and its next run has none,
    nor one through another Compile Model node."""
    import logging

    from comfy_para_attn.adapters.comfy import modulation_table as adapter

    monkeypatch.setattr(adapter, "BETWEEN_SIGMAS", ())
    monkeypatch.setattr(adapter, "between_sigmas_found", set())
    ref = _sample(cm, _compiled(flux, "per step"), sampler="dpm_2")
    model = _compiled(flux, "precomputed")
    with caplog.at_level(logging.WARNING):
        out = _sample(cm, model, sampler="dpm_2")
    _assert_same(out, ref)
    assert "between the schedule's sigmas" in caplog.text
    assert spy["built"] == 1 and spy["served"] == 7 and spy["calls"] == 14  # 7 calls, then 7 again
    _assert_same(_sample(cm, model, sampler="dpm_2"), ref)
    assert spy["built"] == 1 and spy["served"] == 7 and spy["calls"] == 21
    _sample(cm, _compiled(flux, "precomputed"), sampler="dpm_2")  # Compile Model run again: known too
    assert spy["built"] == 1 and spy["calls"] == 28
    _sample(cm, model)  # euler still has its table
    assert spy["built"] == 2


def test_a_new_prompt_builds_a_new_table_and_the_run_cleans_up(cm, flux, spy):
    from comfy_para_attn.modulation_table import ROWS_ATTR

    model = _compiled(flux, "precomputed")
    for prompt in (1, 2):
        out = _sample(cm, model, prompt_seed=prompt)
        _assert_same(out, _sample(cm, _compiled(flux, "per step"), prompt_seed=prompt))
    assert spy["built"] == 2 and spy["served"] == 8
    dm = flux.model.diffusion_model
    assert all(getattr(m, ROWS_ATTR, None) is None for m in dm.modules())  # detached after every call
    wrapper = model.get_wrappers("apply_model", "para_attn_compile")[0]
    assert wrapper.modulation._entries == {}  # the run's end dropped its tables


def test_other_models_and_foreign_block_patches_compute_per_step(cm, flux, spy, caplog):
    import logging

    model = _compiled(flux, "precomputed")
    model.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 0)
    with caplog.at_level(logging.INFO):
        out = _sample(cm, model)
    _assert_same(out, _sample(cm, _compiled(flux, "per step")))
    assert spy["served"] == 0 and "another node's block patches" in caplog.text
    video = cm.build("hunyuan_video")
    from comfy_para_attn.adapters.comfy.modulation_table import flux_model, object_patches

    assert object_patches(video) == {}
    # newer ComfyUI's FLUX.2 is the same class, with no pooled-text embedder (vector_in None)
    # and one modulation for all blocks: its `vec` is no function of (sigma, pooled text)
    flux2 = cm.build("flux")
    assert flux_model(flux2.model.diffusion_model)
    flux2.model.diffusion_model.vector_in = None
    assert not flux_model(flux2.model.diffusion_model) and object_patches(flux2) == {}


@pytest.mark.parametrize("fp8_first", [True, False])
def test_int8_modulation_composes_with_the_table_in_either_order(cm, flux, fp8_first):
    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.fp8 import apply_fp8
    from comfy_para_attn.quant import FP8Settings
    from comfy_para_attn.quant.modulation import Int8Forward

    fp8 = FP8Settings(modulation="int8")
    settings = CompileSettings(backend="eager")
    model = apply_compile(apply_fp8(flux, fp8), settings) if fp8_first else apply_fp8(apply_compile(flux, settings), fp8)
    classes = {k: v for k, v in model.object_patches.items() if k.endswith("mod.lin.__class__")}
    assert classes and all(issubclass(v, TableForward) and issubclass(v, Int8Forward) for v in classes.values())
    per_step = apply_compile(model, CompileSettings(backend="eager", modulation="per step"))
    assert all(issubclass(per_step.object_patches[k], Int8Forward) and not issubclass(per_step.object_patches[k],
                                                                                     TableForward) for k in classes)
    out = _sample(cm, model)
    _assert_same(out, _sample(cm, per_step))


def test_another_packs_model_wrapper_rules_the_table_out(cm, flux, spy, caplog):
    """A wrapper inside ours could hand the model another sigma or other conds than the
    ones the rows were chosen by: no table then."""
    import logging

    import comfy.patcher_extension

    def shifted_sigma(executor, x, t, *args, **kwargs):
        return executor(x, t * 0.9, *args, **kwargs)

    def with_wrapper(model):
        model = model.clone()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_pack", shifted_sigma)
        return model

    ref = _sample(cm, with_wrapper(_compiled(flux, "per step")))
    with caplog.at_level(logging.INFO):
        out = _sample(cm, with_wrapper(_compiled(flux, "precomputed")))
    _assert_same(out, ref)
    assert spy["served"] == 0 and "other model wrappers" in caplog.text and "other_pack" in caplog.text


def test_dpm_fast_is_known_to_evaluate_between_sigmas(cm, flux, spy, caplog):
    """ComfyUI wraps dpm_fast in a closure of its own name: known, sampled once, no table."""
    import logging

    with caplog.at_level(logging.WARNING):
        out = _sample(cm, _compiled(flux, "precomputed"), sampler="dpm_fast")
    _assert_same(out, _sample(cm, _compiled(flux, "per step"), sampler="dpm_fast"))
    assert spy["built"] == 0 and spy["calls"] > 0 and "sampling again" not in caplog.text


def test_conds_of_part_of_the_run_get_tables_of_their_own(cm, flux, spy, caplog):
    """Two prompts, each for half the run: the batches differ in conds under the same shapes;
    keyed by ComfyUI's cond ids, each batch gets its table (at the step where both are
    active, the batch of both has one too), every call is served, no second pass."""
    import logging

    first, second = cm.conditioning(flux, seed=1), cm.conditioning(flux, seed=7)
    positive = [[first[0][0], {**first[0][1], "start_percent": 0.0, "end_percent": 0.5}],
                [second[0][0], {**second[0][1], "start_percent": 0.5, "end_percent": 1.0}]]
    latent = torch.zeros(cm.latent_shape("flux", height=8, width=8))

    def sample(model):
        return cm.sample(model, positive, [], latent, steps=4, cfg=1.0, seed=5)

    ref = sample(_compiled(flux, "per step"))
    with caplog.at_level(logging.WARNING):
        out = sample(_compiled(flux, "precomputed"))
    _assert_same(out, ref)
    assert spy["built"] >= 2 and spy["served"] == spy["calls"] == 4 and "sampling again" not in caplog.text
