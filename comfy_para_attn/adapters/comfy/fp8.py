"""FP8 Quantize for ComfyUI diffusion models (torchao), applied after LoRA.

Hooks (no forward function is copied):
- a keyed `ON_LOAD` callback. ComfyUI merges weight patches (LoRA etc.) into the weights
  inside `ModelPatcher.load`, then calls ON_LOAD: the callback quantizes the merged weights
  of the selected linear layers there. The pre-quantization weights go into the patcher's
  own `backup` (next to LoRA's), so ComfyUI's `unpatch_model` / `partially_unload` restore
  the original bf16 weights exactly as they do after a LoRA; the next load merges the
  current patches and quantizes again. So a different LoRA or strength changes the output.
- a new `patches_uuid` derived from the parent's and the settings. ComfyUI re-merges
  weights only when `patches_uuid` changes; without it, a plain clone and the FP8 clone of
  one model would share whatever weights happened to be loaded.

With `modulation="int8"`, the modulation layers the exclude patterns keep out of fp8 get
int8 weights the same way (`quant.modulation`: a class object patch, the conversion at
ON_LOAD, the original in `backup`).

Settings live in `transformer_options["para_attn"]["fp8"]` (a picklable `FP8Settings`); the
callback reads them at load time. Layers ComfyUI casts per call because it streams them
(lowvram) or computes in another dtype than it stores them in are left alone, except fp8
e4m3fn weights (fp8 checkpoints, fp8 weight dtypes): their stored fp8 values and scale become
the quantized weight as they are, their bias goes to the compute dtype (both undone from
`backup`), and a class object patch (`quant.stored_fp8`) runs the quantized weight where the
layer's own forward would cast it. Pool workers load plain weights and re-apply this from the settings; the
controller's shared-memory copy comes from `backup`, so quantized tensors never cross.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import time
import uuid

import torch

from ...quant import (DEFAULT_EXCLUDE, FP8Settings, FP8UnavailableError, is_excluded, is_quantized, is_stored_fp8,
                      parse_patterns, plan_for, quantizable_linears,
                      quantize_linear, quantize_stored_fp8, torchao_config)
from ...quant import gelu_fusion, modulation, stored_fp8
from .device_conds import keep_conds_on_device
from .fp8_originals import back_up, hold_host_originals
from .patches import compute_dtype

FEATURE = "fp8"
CALLBACK_KEY = "para_attn_fp8"
_UUID_NAMESPACE = uuid.UUID("5b3c1e8e-8f6a-4f0e-9b7e-2f1a6c0d9e41")

log = logging.getLogger(__name__)
_said_once: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _said_once:
        _said_once.add(message)
        logging.warning("FP8 Quantize: %s", message)


def _settings_of(model_patcher):
    return model_patcher.model_options.get("transformer_options", {}).get("para_attn", {}).get(FEATURE)


def _streamed(module) -> bool:
    """ComfyUI streams this layer's weight to the GPU at every call (lowvram, partial load)."""
    return bool(getattr(module, "weight_function", None) or getattr(module, "bias_function", None)
                or hasattr(module, "prev_comfy_cast_weights"))


def _cast_per_call(module) -> bool:
    """ComfyUI casts this layer's weight at every call and FP8 Quantize leaves it alone: a
    streamed layer, or one stored in another dtype than it computes in that is not fp8."""
    return _streamed(module) or (bool(getattr(module, "comfy_cast_weights", False)) and not is_stored_fp8(module))


def _int8_layers(diffusion_model, settings: FP8Settings) -> list:
    return modulation.modulation_linears(diffusion_model, settings.patterns) if settings.int8_modulation else []


def _hooked_keys(model_patcher) -> set:
    """Weight keys that ComfyUI's hooks (hook LoRAs) patch after ON_LOAD: they add to the
    current weight, which must stay the one they were made for."""
    return {key for patches in (getattr(model_patcher, "hook_patches", None) or {}).values() for key in patches}


def _tensor_bytes(module) -> int:
    """A layer's bytes as ComfyUI counts them when it unloads (its state dict)."""
    import comfy.model_management

    return comfy.model_management.module_size(module)


def quantize_loaded_model(model_patcher, settings: FP8Settings) -> dict:
    """Quantize the loaded, patch-merged weights of `model_patcher` in place; return counts.
    Idempotent: layers already quantized are skipped. ComfyUI counted the loaded weights at
    their size before this; the bytes freed on the GPU, as its `module_size` counts them, come
    off that count, or a later partial unload (which counts the smaller tensors) leaves phantom
    loaded memory. `module_size` counts torchao's fp8 tensors at their logical (bf16) size, so
    only the int8 layers' savings show there (docs/design-notes.md says why that stays)."""
    dm = model_patcher.model.diffusion_model
    counts = collections.Counter()
    configs = {}  # (device, dtype) -> (plan, torchao config)
    hooked = _hooked_keys(model_patcher)
    load_device = torch.device(model_patcher.load_device)
    freed = 0
    started = time.perf_counter()

    def convertible(name, module, already) -> bool:
        if already:
            counts["already"] += 1
        elif _cast_per_call(module):
            counts["cast per call"] += 1
        elif f"diffusion_model.{name}.weight" in hooked:
            counts["hooked"] += 1
        else:
            return True
        return False

    def replace(name, module, convert) -> int:
        """Back up the layer's weight, convert it in place; the GPU bytes that freed."""
        weight, before = module.weight, _tensor_bytes(module)
        back_up(model_patcher, f"diffusion_model.{name}.weight", weight)
        convert(module)
        return before - _tensor_bytes(module) if weight.device == load_device else 0

    with torch.no_grad():
        for name, module in quantizable_linears(dm, settings.patterns):
            from_fp8 = is_stored_fp8(module)
            if from_fp8 and not isinstance(module, (stored_fp8.QuantizedCastForward, gelu_fusion.GeluThenLinear)):
                counts["foreign class"] += 1  # another node's class patch: its forward would cast the weight
                continue
            if not convertible(name, module, is_quantized(module.weight)):
                continue
            weight = module.weight
            dtype = compute_dtype(model_patcher.model) if from_fp8 else weight.dtype
            where = (weight.device, dtype)
            if where not in configs:
                plan = plan_for(settings, weight.device, dtype)
                if plan.note:
                    _log_once(plan.note)
                configs[where] = (plan, plan.torchao_config())
            plan, config = configs[where]
            if from_fp8:
                kept = []
                freed += replace(name, module, lambda m: kept.append(
                    _quantize_stored_fp8(model_patcher, name, m, config, dtype)))
                counts["stored fp8"] += kept == [True]
            else:
                freed += replace(name, module, lambda m: quantize_linear(m, config))
            counts[plan.mode] += 1
        int8_layers = _int8_layers(dm, settings)
        into_fp8 = [n for n, _ in modulation.modulation_layers(dm)
                    if not is_excluded(n, settings.patterns)] if settings.int8_modulation else []
        if into_fp8:
            _log_once(f"exclude lets {len(into_fp8)} modulation layers into fp8: modulation 'int8' takes only those "
                      "exclude keeps out (its default has '*_mod, *modulation*')")
        if settings.int8_modulation and not int8_layers and any(
                is_stored_fp8(m) for _, m in modulation.modulation_layers(dm)):
            _log_once("the modulation layers are stored in fp8 (an fp8 checkpoint): modulation 'int8' leaves them so")
        elif settings.int8_modulation and not int8_layers and not into_fp8:
            _log_once(f"no modulation layer of {type(dm).__name__} matches {', '.join(modulation.MODULATION_PATTERNS)}: "
                      "modulation 'int8' changes nothing")
        for name, module in int8_layers:
            if not convertible(name, module, modulation.is_int8(module)):
                continue
            freed += replace(name, module, modulation.to_int8)
            counts["int8"] += 1
        fused_layers = [m for m in dm.modules()
                        if isinstance(m, gelu_fusion.GeluThenLinear) and gelu_fusion.rowwise_dynamic_fp8(m.weight)]
        counts["gelu fused"] = sum(m._para_attn_gelu_from < m.in_features for m in fused_layers)
        counts["one pass"] = len(fused_layers) - counts["gelu fused"]
    model = model_patcher.model
    if freed and hasattr(model, "model_loaded_weight_memory"):
        model.model_loaded_weight_memory = max(0, model.model_loaded_weight_memory - freed)
    _log_counts(counts, configs, time.perf_counter() - started)
    return dict(counts)


def _quantize_stored_fp8(model_patcher, name: str, module, config, dtype: torch.dtype) -> bool:
    """Quantize a layer whose weight is stored in fp8 (`quant.quantize_stored_fp8`); its bias
    goes to the compute dtype `dtype` (ComfyUI cast it per call; the original goes to `backup`). Its
    class (`_cast_layer_classes`) then runs the quantized weight. True when the stored bytes
    were kept."""
    if module.bias is not None and module.bias.dtype != dtype:
        back_up(model_patcher, f"diffusion_model.{name}.bias", module.bias)
        module.bias = torch.nn.Parameter(module.bias.to(dtype), requires_grad=False)
    if quantize_stored_fp8(module, config, dtype):
        return True
    _log_once("this torchao keeps fp8 weights in a layout FP8 Quantize does not know: the fp8 checkpoint's "
              "weights were rounded to fp8 a second time")
    return False


def _log_counts(counts, configs, seconds: float) -> None:
    done = [f"{counts[mode]} {mode} linear layers to fp8" for mode in ("dynamic", "weight-only") if counts[mode]]
    if done and configs:
        done[-1] += f" ({', '.join(sorted({p.granularity for p, _ in configs.values()}))} scales)"
    if counts["stored fp8"]:
        done.append(f"{counts['stored fp8']} of them keep their stored fp8 weights and scales")
    done += [f"{counts[key]} {what}" for key, what in (
        ("int8", "modulation layers to int8 weights"),
        ("gelu fused", "GELUs fused into the activation quantization"),
        ("one pass", "more layers quantizing their input in one pass (modulated LayerNorms fused in under "
                     "Compile Model)")) if counts[key]]
    if counts["dynamic"] or counts["weight-only"] or counts["int8"]:
        logging.info("FP8 Quantize: %s in %.2f s", "; ".join(done), seconds)
    if counts["cast per call"]:
        _log_once(f"{counts['cast per call']} linear layers stay unquantized because ComfyUI casts their "
                  "weights per call (partially loaded model, lowvram, or weights stored in another dtype)")
    if counts["foreign class"]:
        _log_once(f"{counts['foreign class']} fp8 checkpoint linear layers stay unquantized because another node "
                  "replaced their class (their forward would cast a quantized weight)")
    if counts["hooked"]:
        _log_once(f"{counts['hooked']} linear layers stay unquantized because hooks (hook LoRAs) patch them")


def _fuse_gelus(model, settings: FP8Settings) -> None:
    """Object patches that move the tanh GELU in front of each fp8 linear layer into its
    activation quantization (`quant.gelu_fusion`), for dynamic row-wise settings; ComfyUI
    applies them at every load and undoes them at unpatch. Other settings drop them.
    The layers fed by a modulated LayerNorm get the same class without a GELU, so that
    compiled blocks fold the LayerNorm into the quantization (`quant.norm_fold`).
    The double blocks' attention output projections get it too (one pass over each row).
    PARA_ATTN_FP8_FUSED_GELU=0 turns all of it off, PARA_ATTN_FP8_FUSED_NORM=0 the LayerNorm
    part, PARA_ATTN_FP8_OWN_QUANT=0 the projections' (for comparisons)."""
    _drop_object_patches(model, _is_fusion_patch)
    if not (settings.mode == "dynamic" and settings.granularity == "row-wise"
            and os.environ.get("PARA_ATTN_FP8_FUSED_GELU", "1") != "0"):
        return
    dm = model.model.diffusion_model
    quantized = {name for name, _ in quantizable_linears(dm, settings.patterns)}
    sites = gelu_fusion.all_sites(dm, norm_fed=os.environ.get("PARA_ATTN_FP8_FUSED_NORM", "1") != "0",
                                  attention_outputs=os.environ.get("PARA_ATTN_FP8_OWN_QUANT", "1") != "0")
    sites = [s for s in sites if s.linear in quantized]
    for path, value in gelu_fusion.patches(dm, sites).items():
        model.add_object_patch(f"diffusion_model.{path}", value)


def _cast_layer_classes(model, settings: FP8Settings) -> None:
    """Object patches that give the layers to quantize whose class casts per call (an fp8
    checkpoint's) the forward that runs a quantized weight (`quant.stored_fp8`); layers with
    a fused class have it already. Settings that quantize nothing drop them."""
    def ours(value):
        return isinstance(value, type) and issubclass(value, stored_fp8.QuantizedCastForward)

    _drop_object_patches(model, ours)
    if not settings.enabled:
        return
    for name, module in quantizable_linears(model.model.diffusion_model, settings.patterns):
        key = f"diffusion_model.{name}.__class__"
        if stored_fp8.class_casts_weights(type(module)) and key not in model.object_patches:
            model.add_object_patch(key, stored_fp8.quantized_cast_class(type(module)))


def _drop_object_patches(model, ours) -> None:
    """Remove the object patches `ours(value)` claims (an earlier FP8 Quantize's), so that
    applying it again replaces them."""
    for key in [k for k, v in model.object_patches.items() if ours(v)]:
        del model.object_patches[key]


def _is_fusion_patch(value) -> bool:
    return isinstance(value, gelu_fusion.GeluMovedOn) or (
        isinstance(value, type) and issubclass(value, gelu_fusion.GeluThenLinear))


def _int8_modulation(model, settings: FP8Settings) -> None:
    """Object patches that give the modulation layers the int8 forward (`quant.modulation`);
    settings without it drop them. Compile Model's precomputed modulation (a class over the
    layer's) stays on top."""
    from ...modulation_table import TableForward, table_class

    tabled = {k: v for k, v in model.object_patches.items() if isinstance(v, type) and issubclass(v, TableForward)}
    _drop_object_patches(model, lambda v: isinstance(v, type) and issubclass(v, modulation.Int8Forward))
    for path, value in modulation.patches(_int8_layers(model.model.diffusion_model, settings)).items():
        key = f"diffusion_model.{path}"
        model.add_object_patch(key, table_class(value) if key in tabled else value)
    for key, value in tabled.items():
        if key not in model.object_patches:  # it was over an int8 class that is gone now
            model.add_object_patch(key, table_class(value._para_attn_base))


class FP8OnLoad:
    """The keyed ON_LOAD callback; stateless (settings are read from the patcher)."""

    def __call__(self, model_patcher, device_to, lowvram_model_memory, force_patch_weights, full_load):
        settings = _settings_of(model_patcher)
        if settings is None or not settings.enabled:
            return
        if force_patch_weights:  # a load for saving, merging or extracting: they read the weights
            _log_once("weights loaded to be read (saving, merging, LoRA extraction) stay unquantized")
            # ComfyUI marks the weights as this clone's; its next sampling load would then keep
            # them (fully loaded, same patches) and run bf16 without calling us. A mark of no
            # clone makes that load restore and load again, which quantizes.
            model_patcher.model.current_weight_patches_uuid = uuid.uuid4()
            return
        quantize_loaded_model(model_patcher, settings)

    def __repr__(self):
        return "FP8OnLoad()"


class FP8HoldHostWeights:
    """The keyed OUTER_SAMPLE wrapper: before sampling loads the model, hold its host weights."""

    def __call__(self, executor, *args, **kwargs):
        patcher = executor.class_obj.model_patcher
        settings = _settings_of(patcher)
        if settings is not None and settings.enabled:
            dm = patcher.model.diffusion_model
            hold_host_originals(patcher, lambda: quantizable_linears(dm, settings.patterns) + _int8_layers(dm, settings))
        return executor(*args, **kwargs)

    def __repr__(self):
        return "FP8HoldHostWeights()"


def _quantized_by_comfyui(root) -> int:
    """How many layers newer ComfyUI runs quantized itself (its mixed-precision ops, which load
    fp8_scaled and other quantized checkpoints with their weights as QuantizedTensor)."""
    return sum(1 for m in root.modules()
               if getattr(m, "quant_format", None) is not None
               or type(getattr(m, "weight", None)).__name__ == "QuantizedTensor")


def warn_unmatched_patterns(model_patcher, settings: FP8Settings) -> None:
    """Log the user's exclude patterns that match no module of this model (a typo, or the wrong
    case, would quietly quantize what was meant to be kept); the default list names the layers
    of several model families, so its own patterns are not checked. The node calls it (not the
    pool's workers, which apply the same settings again)."""
    diffusion_model = model_patcher.model.diffusion_model
    defaults = parse_patterns(DEFAULT_EXCLUDE)
    own = [p for p in settings.patterns if p not in defaults]
    if not own:
        return
    modules = [(name, module) for name, module in diffusion_model.named_modules() if name]
    unmatched = [p for p in own if not any(is_excluded(name, (p,)) for name, _ in modules)]
    example = next((name for name, module in modules if isinstance(module, torch.nn.Linear)), "")
    for pattern in unmatched:
        _log_once(f"exclude pattern {pattern!r} matches no layer of this {type(diffusion_model).__name__}, so it "
                  f"excludes nothing (patterns are case-sensitive globs over names such as {example!r})")


def _check_quantizable(model_patcher, settings: FP8Settings) -> bool:
    """Whether there is anything to quantize: False (logged) where ComfyUI already runs every
    candidate layer quantized itself; FP8UnavailableError where the model cannot be quantized."""
    dm = model_patcher.model.diffusion_model
    layers = quantizable_linears(dm, settings.patterns)
    by_comfyui = 0 if layers else _quantized_by_comfyui(dm)
    if by_comfyui:
        logging.info("FP8 Quantize: ComfyUI already runs %d layers of this %s checkpoint quantized (its "
                     "mixed-precision ops); FP8 Quantize leaves the model as it is.", by_comfyui, type(dm).__name__)
        return False
    if not layers:
        raise FP8UnavailableError(
            f"FP8 Quantize found no linear layer to quantize in {type(dm).__name__}: every linear layer with "
            "dims divisible by 16 is excluded, or its weights are in a format it does not take (fp8 e5m2). Load "
            "the model with weight_dtype 'default' or 'fp8_e4m3fn' and check the exclude patterns.")
    if all(getattr(type(m), "comfy_cast_weights", False) and not is_stored_fp8(m) and not is_quantized(m.weight)
           for _, m in layers):  # (another FP8 clone may have this model loaded, quantized)
        raise FP8UnavailableError(
            "FP8 Quantize cannot quantize this model: ComfyUI casts its weights at every call (weights stored "
            "in a different dtype than the compute dtype). Load it with weight_dtype 'default'.")
    torchao_config("weight-only", settings.granularity)  # torchao importable? (clear error now, not at load)
    return True


def apply_fp8(model_patcher, settings: FP8Settings):
    """Return a clone of `model_patcher` whose selected linear layers are quantized to fp8
    at every load, after its weight patches are merged.

    The single entry point for the node and for pool workers. Applying it again replaces the
    settings. Raises FP8UnavailableError when the model has nothing to quantize or torchao is
    missing. mode "off" leaves a model without FP8 unchanged (same patches_uuid), and turns an
    upstream FP8 Quantize off.
    """
    import comfy.patcher_extension

    model = model_patcher.clone()
    keep_conds_on_device(model)
    on_load = comfy.patcher_extension.CallbacksMP.ON_LOAD
    has_callback = any(isinstance(c, FP8OnLoad) for c in model.get_all_callbacks(on_load))
    if settings.enabled and not _check_quantizable(model, settings):
        settings = dataclasses.replace(settings, mode="off")  # ComfyUI quantizes it already
    to = model.model_options.setdefault("transformer_options", {})
    to["para_attn"] = {**to.get("para_attn", {}), FEATURE: settings}
    if not settings.enabled and not has_callback:
        return model  # nothing to undo: the plain model, untouched
    _fuse_gelus(model, settings)
    _cast_layer_classes(model, settings)
    _int8_modulation(model, settings)
    # A new weight identity, so ComfyUI re-merges (and we re-quantize) when switching between
    # this clone and any other clone of the same model; deterministic, so a pool worker that
    # re-applies the same settings to the same patches reuses its loaded weights.
    model.patches_uuid = uuid.uuid5(_UUID_NAMESPACE, f"{model.patches_uuid}|{settings!r}")
    if not has_callback:
        model.add_callback_with_key(on_load, CALLBACK_KEY, FP8OnLoad())
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CALLBACK_KEY, FP8HoldHostWeights())
    log.debug("FP8 Quantize: %s", settings)
    return model
