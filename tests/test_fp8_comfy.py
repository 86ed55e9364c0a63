"""ComfyUI tier: FP8 Quantize on a tiny bf16 ComfyUI Flux model sampled through ComfyUI's real
sampling on CPU. The CPU runs torchao's weight-only fp8 (the fallback of the dynamic default,
logged once); the dynamic path needs a GPU with compute capability >= 8.9 (bench/)."""
import logging

import pytest
import torch

from comfy_para_attn.quant import FP8Settings, FP8UnavailableError, modulation

pytest.importorskip("torchao", reason="FP8 Quantize needs torchao (a runtime dependency in pyproject)")

STEPS = 3


@pytest.fixture(scope="module")
def fp8(comfyui_path):
    from comfy_para_attn.adapters.comfy import fp8

    return fp8


@pytest.fixture(scope="module")
def flux(cm):
    return cm.build("flux", dtype=torch.bfloat16)


def _run(cm, model, seed=0):
    pos = cm.conditioning(model, seed=1)
    return cm.sample(model, pos, [], torch.zeros(cm.latent_shape("flux")), steps=STEPS, cfg=1.0, seed=seed)


def _quantized_names(model):
    from comfy_para_attn.quant import is_quantized

    return {n for n, m in model.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and is_quantized(m.weight)}


MODULATION = {f"double_blocks.{i}.{s}_mod.lin" for i in range(2) for s in ("img", "txt")} | {
    f"single_blocks.{i}.modulation.lin" for i in range(2)} | {"final_layer.adaLN_modulation.1"}


def _int8_names(model):
    return {n for n, m in model.model.diffusion_model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.int8}


def _on_load():
    import comfy.patcher_extension

    return comfy.patcher_extension.CallbacksMP.ON_LOAD


def _weights(model):
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def test_weight_only_fallback_and_default_exclusions(cm, fp8, flux, caplog):
    plain, before = _run(cm, flux), _weights(flux)
    model = fp8.apply_fp8(flux, FP8Settings())
    seen = {}
    model.add_callback(_on_load(),
                       lambda p, *a: seen.setdefault("names", (_quantized_names(p), _int8_names(p))))
    fp8._said_once.clear()
    with caplog.at_level(logging.INFO):
        out = _run(cm, model)
        _run(cm, flux)  # switch back and forth: each load re-merges and re-quantizes
        again = _run(cm, model)
    assert caplog.text.count("uses weight-only fp8") == 1  # the fallback is said once
    assert "linear layers to fp8" in caplog.text
    blocks = {f"double_blocks.{i}.{s}_{p}" for i in range(2) for s in ("img", "txt")
              for p in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")}
    blocks |= {f"single_blocks.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    assert seen["names"] == (blocks, set())  # embedders, modulation and final layer stay bf16
    rel = (out - plain).abs().mean() / plain.abs().mean()
    assert 0 < rel < 0.1, rel
    assert torch.equal(out, again)
    assert torch.equal(_run(cm, flux), plain)  # the plain clone gets its bf16 weights back
    after = _weights(flux)
    assert all(torch.equal(before[k], after[k]) and type(after[k]) is torch.Tensor for k in before)


def test_backup_is_the_held_host_weight_not_a_copy(cm, fp8, flux):
    """The bf16 originals kept for unloading are the host tensors the weights were loaded
    from, held before each prompt's load, not copies made after it (11 s for FLUX.1-dev on
    an H100); a held tensor that no longer matches its weight is not used."""
    import comfy.patcher_extension

    from comfy_para_attn.adapters.comfy import fp8_originals

    before = _weights(flux)
    model = fp8.apply_fp8(flux, FP8Settings())
    stale = {}

    def make_one_stale(executor, *args, **kwargs):  # runs inside FP8 Quantize's wrapper
        held = fp8_originals._host_originals[flux.model]
        key = sorted(held)[0]
        stale[key] = held[key]
        held[key] = held[key].clone()
        held[key][0] += 1  # looks like the weight, but its first row differs
        return executor(*args, **kwargs)

    model.add_wrapper(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, make_one_stale)
    seen = {}
    model.add_callback(_on_load(), lambda p, *a: seen.update(
        held=dict(fp8_originals._host_originals[p.model]), backups={k: b.weight for k, b in p.backup.items()}))
    for _ in range(2):  # the second prompt holds the weights the first one's unload restored
        _run(cm, model)
        held, backups = seen.pop("held"), seen.pop("backups")
        assert len(held) == 20  # 2 double blocks x 8 + 2 single blocks x 2 linear layers
        (key, original), = stale.items()
        assert all(backups[k] is held[k] for k in held if k != key)
        assert backups[key] is not held[key] and torch.equal(backups[key], original)
        _run(cm, flux)  # switch to the plain clone: the FP8 clone's weights are restored
        after = _weights(flux)
        assert all(torch.equal(before[k], after[k]) for k in before)
        stale.clear()


def test_custom_exclusions_and_off(cm, fp8, flux):
    plain = _run(cm, flux)
    singles_only = fp8.apply_fp8(flux, FP8Settings(exclude="double_blocks, *_in, final_layer, *mod*"))
    names = []
    singles_only.add_callback(_on_load(),
                              lambda p, *a: names.append(_quantized_names(p)))
    _run(cm, singles_only)
    assert names[0] == {f"single_blocks.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    off = fp8.apply_fp8(flux, FP8Settings(mode="off"))
    assert off.patches_uuid == flux.patches_uuid and torch.equal(_run(cm, off), plain)
    turned_off = fp8.apply_fp8(fp8.apply_fp8(flux, FP8Settings()), FP8Settings(mode="off"))
    assert torch.equal(_run(cm, turned_off), plain)
    with pytest.raises(FP8UnavailableError, match="no linear layer"):
        fp8.apply_fp8(flux, FP8Settings(exclude="*"))


def test_an_exclude_pattern_that_matches_nothing_is_named_in_the_log(cm, fp8, flux, caplog):
    """A typo ('Double_blocks' for 'double_blocks') would quietly quantize the layers meant to be
    kept: the log names the pattern; the default list's own patterns are not reported."""
    fp8._said_once.clear()
    with caplog.at_level(logging.WARNING):
        for settings in (FP8Settings(exclude="Double_blocks, single_blocks.0, *_in"), FP8Settings()):
            fp8.warn_unmatched_patterns(flux, settings)  # (the node's call; the workers' apply_fp8 says nothing)
    assert "exclude pattern 'Double_blocks' matches no layer of this Flux" in caplog.text
    assert caplog.text.count("matches no layer") == 1  # single_blocks.0 and *_in match; the defaults are not checked


def test_modulation_layers_of_flux2(cm):
    """Newer ComfyUI's FLUX.2 shares one modulation per stream kind across its blocks: the
    int8 modulation takes all four (its double stream's image and text layers were missed)."""
    import comfy.supported_models

    from comfy_para_attn.quant.modulation import modulation_layers

    if not hasattr(comfy.supported_models, "Flux2"):
        pytest.skip("this ComfyUI has no FLUX.2")
    names = {name for name, _ in modulation_layers(cm.build("flux2").model.diffusion_model)}
    assert names == {"double_stream_modulation_img.lin", "double_stream_modulation_txt.lin",
                     "single_stream_modulation.lin", "final_layer.adaLN_modulation.1"}, names


def test_modulation_int8_or_original(cm, fp8, flux, caplog):
    """Int8 modulation weights move the output a little; "original" (the default) leaves those
    layers as loaded; switching between the two clones restores and converts again."""
    names = []
    int8 = fp8.apply_fp8(flux, FP8Settings(modulation="int8"))
    original = fp8.apply_fp8(flux, FP8Settings())
    for model in (int8, original):
        model.add_callback(_on_load(), lambda p, *a: names.append((_quantized_names(p), _int8_names(p))))
    assert int8.patches_uuid != original.patches_uuid
    with caplog.at_level(logging.INFO):
        with_int8, without = _run(cm, int8), _run(cm, original)
    assert "7 modulation layers to int8 weights" in caplog.text
    assert names[0][1] == MODULATION and names[1][1] == set() and names[0][0] == names[1][0]
    rel = (with_int8 - without).abs().mean() / without.abs().mean()
    assert 0 < rel < 0.05, rel
    assert torch.equal(_run(cm, int8), with_int8)  # converted again from the restored weights
    lin = flux.model.diffusion_model.double_blocks[0].img_mod.lin
    assert lin.weight.dtype == torch.int8 and isinstance(lin, modulation.Int8Forward)
    _run(cm, flux)  # the plain clone: ComfyUI undoes the class patch and restores the weight
    assert not isinstance(lin, modulation.Int8Forward) and lin.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="modulation"):
        FP8Settings(modulation="fp4")
    caplog.clear()
    with caplog.at_level(logging.INFO):  # an exclude that lets the modulation layers into fp8
        _run(cm, fp8.apply_fp8(flux, FP8Settings(modulation="int8", exclude="img_in, final_layer")))
    assert "exclude lets 6 modulation layers into fp8" in caplog.text
    assert "changes nothing" not in caplog.text


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_change_requantizes(cm, fp8, flux, lora_first):
    lora = cm.random_lora(flux, scale=1.0, max_layers=40)
    settings = FP8Settings()

    def build(strength):
        if lora_first:
            return fp8.apply_fp8(cm.apply_lora(flux, lora, strength), settings)
        return cm.apply_lora(fp8.apply_fp8(flux, settings), lora, strength)

    strong, weak = _run(cm, build(1.0)), _run(cm, build(0.25))
    assert (strong - weak).abs().mean() > 0.05 * strong.abs().mean()
    reference = _run(cm, cm.apply_lora(flux, lora, 0.25))  # bf16 with the same LoRA
    assert (weak - reference).abs().mean() < 0.1 * reference.abs().mean()


def test_node(cm, flux, pack_nodes):
    node = pack_nodes["ParaAttnFP8Quantize"]
    inputs = node.INPUT_TYPES()["required"]
    optional = node.INPUT_TYPES()["optional"]
    assert list(inputs) == ["model", "granularity", "mode", "exclude"] and list(optional) == ["modulation"]
    assert all(opts.get("tooltip") for _, opts in [*inputs.values(), *optional.values()])
    (model,) = node().apply(flux, "tensor-wise", "weight-only", "img_in")
    assert model.model_options["transformer_options"]["para_attn"]["fp8"] == FP8Settings("tensor-wise",
                                                                                         "weight-only", "img_in")
    (model,) = node().apply(flux, "row-wise", "weight-only", "img_in", modulation="int8")
    assert model.model_options["transformer_options"]["para_attn"]["fp8"].modulation == "int8"
    assert torch.isfinite(_run(cm, model)).all()


def test_loaded_memory_count_follows_the_smaller_weights(cm, fp8, flux):
    """ComfyUI counts a model's loaded bytes before ON_LOAD converts the weights; the bytes
    conversion frees come off that count, so unloading every layer leaves what it leaves for
    the plain model (it left more by what int8 had saved: phantom memory ComfyUI kept free)."""
    left = {}
    for name, model in (("plain", flux), ("fp8", fp8.apply_fp8(flux, FP8Settings(modulation="int8")))):
        _run(cm, model)
        left[name, "loaded"] = model.model.model_loaded_weight_memory
        model.partially_unload(model.offload_device, 1e30)
        left[name] = model.model.model_loaded_weight_memory
    assert left["fp8", "loaded"] < left["plain", "loaded"]  # the int8 weights' saving is counted
    assert left["fp8"] == left["plain"], left  # ComfyUI's own remainder (buffers outside its load list)
    _run(cm, flux)


def test_a_load_for_saving_reads_the_unquantized_weights(cm, fp8, flux):
    """A load with force_patch_weights (ComfyUI's checkpoint save, model merge and LoRA
    extraction) leaves the weights as merged: the saved file holds no fp8 or int8 values."""
    import comfy.model_management

    plain = _weights(flux)
    model = fp8.apply_fp8(flux, FP8Settings(modulation="int8"))
    before_save = _run(cm, model)
    quantized = _quantized_names(model)
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)
    saved = model.model_state_dict("diffusion_model.")
    assert set(saved) == {f"diffusion_model.{k}" for k in plain}
    assert all(type(saved[f"diffusion_model.{k}"]) is torch.Tensor
               and torch.equal(saved[f"diffusion_model.{k}"].cpu(), v) for k, v in plain.items())
    # Sampling after the save runs quantized again, not the weights the save loaded.
    after_save = _run(cm, model)
    assert quantized and _quantized_names(model) == quantized
    assert torch.equal(after_save, before_save)
    assert not torch.equal(after_save, _run(cm, flux))


def test_in_place_restore_and_hooked_layers_keep_their_weights_right(cm, fp8, flux, caplog):
    """With `weight_inplace_update` ComfyUI restores a LoRA'd weight by copying into the
    parameter: a converted layer's backup becomes a replacement instead (a copy into the int8
    or fp8 tensor would scramble it; the next load would then skip it as converted). Layers a
    hook LoRA patches after ON_LOAD are not converted."""
    lora = cm.random_lora(flux, scale=1.0, max_layers=40)  # every 2-D weight of the tiny model
    assert any("img_mod.lin" in key for key in lora)
    with_lora = cm.apply_lora(flux, lora, 0.5)
    reference = _run(cm, fp8.apply_fp8(with_lora, FP8Settings(modulation="int8")))
    in_place = fp8.apply_fp8(with_lora, FP8Settings(modulation="int8"))
    in_place.weight_inplace_update = True
    for _ in range(2):  # switching away restores in place; coming back converts again
        assert torch.equal(_run(cm, in_place), reference)
        _run(cm, flux)
        lin = flux.model.diffusion_model.double_blocks[0].img_mod.lin
        assert lin.weight.dtype == torch.bfloat16 and not isinstance(lin, modulation.Int8Forward)
    hooked = fp8.apply_fp8(flux, FP8Settings(modulation="int8"))
    key = "diffusion_model.double_blocks.0.img_mod.lin.weight"
    hooked.hook_patches = {"a hook": {key: []}}  # what a hook LoRA registers (not applied here)
    names = []
    hooked.add_callback(_on_load(), lambda p, *a: names.append(_int8_names(p)))
    fp8._said_once.clear()
    with caplog.at_level(logging.WARNING):
        _run(cm, hooked)
    assert names[0] == MODULATION - {"double_blocks.0.img_mod.lin"}
    assert "because hooks (hook LoRAs) patch them" in caplog.text
    _run(cm, flux)


@pytest.fixture(scope="module")
def fp8_checkpoints(cm):
    """A tiny Wan 2.1 as ComfyUI loads fp8 checkpoints: an fp8_scaled file (its scaled fp8
    layers) and the bf16 file with weight_dtype fp8_e4m3fn (manual cast, no scale)."""
    import comfy.sd

    from comfy_para_attn.testing import tiny_files

    state = tiny_files.random_state_dict(tiny_files.shapes_of("wan"), seed=0)
    return {"fp8_scaled": comfy.sd.load_diffusion_model_state_dict(tiny_files.fp8_scaled_state_dict(state)),
            "fp8_e4m3fn": comfy.sd.load_diffusion_model_state_dict(state, model_options={"dtype": torch.float8_e4m3fn})}


def _assert_left_to_comfyui(cm, fp8, model, caplog):
    """Newer ComfyUI loads fp8_scaled files with its own quantized layers: FP8 Quantize says so
    and leaves the model as it is (the workflow runs, sampling equals ComfyUI's own)."""
    with caplog.at_level(logging.INFO):
        left = fp8.apply_fp8(model, FP8Settings())
    assert "FP8 Quantize leaves the model as it is" in caplog.text
    assert left.patches_uuid == model.patches_uuid and not left.get_all_callbacks(_on_load())
    positive = cm.conditioning(model, seed=1)
    outs = [cm.sample(p, positive, [], torch.zeros(cm.latent_shape("wan")), steps=STEPS, cfg=1.0)
            for p in (model, left)]
    assert torch.isfinite(outs[0]).all() and torch.equal(*outs)


@pytest.mark.parametrize("kind", ["fp8_scaled", "fp8_e4m3fn"])
def test_fp8_checkpoints_keep_their_stored_weights(cm, fp8, fp8_checkpoints, kind, caplog):
    """ComfyUI casts an fp8 checkpoint's weights at every call. FP8 Quantize takes the stored
    fp8 values and scale as the quantized weight as they are (no second rounding), so the CPU's
    weight-only fp8 computes with ComfyUI's very weights: outputs equal within float sums
    (1e-5; a second rounding gives ~1e-2), LoRA included. A partial unload and the plain model
    get the fp8 weights, fp8 biases and per-call casting back."""
    from comfy_para_attn.testing.fp8_checks import kept_stored_fp8, stored_fp8_layers

    model = fp8_checkpoints[kind]
    if fp8._quantized_by_comfyui(model.model.diffusion_model):  # newer ComfyUI: its mixed-precision ops
        _assert_left_to_comfyui(cm, fp8, model, caplog)
        return
    layers = stored_fp8_layers(model)
    blocks = sorted(n for n in layers if n.startswith("blocks."))  # the embedders and head are excluded
    assert len(layers) == 26 and len(blocks) == 20  # 2 x (self and cross attention q, k, v, o + MLP 2)
    before = {n: (m.weight.view(torch.uint8).clone(), m.bias.dtype, type(m)) for n, m in layers.items()}
    positive = cm.conditioning(model, seed=1)

    def run(patcher):
        with torch.inference_mode():  # as ComfyUI samples (its LoRA rounding into fp8 needs it)
            out = cm.sample(patcher, positive, [], torch.zeros(cm.latent_shape("wan")), steps=STEPS, cfg=1.0)
        assert torch.isfinite(out).all()
        return out

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    kept = []
    quantized = fp8.apply_fp8(model, FP8Settings())
    quantized.add_callback(_on_load(), lambda p, *a: kept.append(kept_stored_fp8(p, blocks)))
    fp8._said_once.clear()
    with caplog.at_level(logging.INFO):
        plain, ours = run(model), run(quantized)
    assert kept == [20] and "20 of them keep their stored fp8 weights and scales" in caplog.text
    assert rel(ours, plain) < 1e-5
    twin = quantized.clone()  # same weights: ComfyUI swaps the object patches, keeps the weights
    assert torch.equal(run(twin), ours) and kept == [20]
    quantized.partially_unload(quantized.offload_device, 1e30)  # the stored weights come back
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.bias.dtype == before[n][1] for n, m in layers.items())
    assert torch.equal(run(quantized), ours) and kept == [20, 20]
    assert torch.equal(run(model), plain)  # the plain model: ComfyUI's weights, biases and classes
    assert all(torch.equal(m.weight.view(torch.uint8), before[n][0]) and (m.bias.dtype, type(m)) == before[n][1:]
               for n, m in layers.items())
    # ComfyUI's loaded-bytes count: what a full unload takes off is what the load put on
    left = {}
    for patcher in (model, quantized):
        run(patcher)
        patcher.partially_unload(patcher.offload_device, 1e30)
        left[patcher is model] = patcher.model.model_loaded_weight_memory
    assert left[True] == left[False], left

    # another node's class on a layer (after FP8 Quantize): its forward would cast, so it stays fp8
    foreign = quantized.clone()
    foreign.add_object_patch("diffusion_model.blocks.0.self_attn.q.__class__",
                             type("OtherPacksLinear", (before["blocks.0.self_attn.q"][2],), {}))
    kept.clear()
    with caplog.at_level(logging.WARNING):
        assert rel(run(foreign), plain) < 1e-5 and kept == [19]
    assert "1 fp8 checkpoint linear layers stay unquantized because another node replaced their class" in caplog.text

    lora = cm.apply_lora(model, cm.random_lora(model, max_layers=40))  # ComfyUI rounds it into fp8
    plain_lora, ours_lora = run(lora), run(fp8.apply_fp8(lora, FP8Settings()))
    assert rel(plain_lora, plain) > 0.05 and rel(ours_lora, plain_lora) < 1e-5
    run(model)
