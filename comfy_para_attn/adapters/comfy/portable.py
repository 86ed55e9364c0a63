"""Turn the pieces of a ComfyUI sampling run into things a pool worker can rebuild.

What crosses the pipe: the model's config object, its ComfyUI weight patches (LoRA etc.,
applied by ComfyUI's own code in the worker), object patches (e.g. ModelSamplingFlux's
sampling object), model_options minus our own hooks (re-created from their settings in the
worker), the conds, the sampler object, the guider's plain attributes. Weights do not
cross the pipe; they go through shared memory once (see pool.transfer).

Anything that cannot be sent gets a clear error naming it, never a silent drop.
"""
from __future__ import annotations

import copy

from ... import refs
from ...refs import ObjectRef

OUR_PREFIX = "para_attn"
_OUR_MODULE = "comfy_para_attn.adapters.comfy"  # hooks our nodes install


class NotPortableError(ValueError):
    pass


def _is_ours(obj, package: str = _OUR_MODULE) -> bool:
    """Defined in `package` (by default where our nodes' hooks live)."""
    return (type(obj).__module__.startswith(package)
            or str(getattr(obj, "__module__", "")).startswith(package))


def _check_picklable(what: str, obj) -> None:
    try:
        refs.dumps(obj)  # as the payload is pickled (functions of path-named modules by file)
    except Exception as exc:  # pickle raises many types for unpicklable objects
        raise NotPortableError(
            f"Context Parallel cannot send {what} to its workers ({type(exc).__name__}: {exc}). "
            "Remove the node that added it, or run without Context Parallel."
        ) from None


def _strip_block_patch(patch):
    """Our block patches are re-created in the worker; keep other packs' layers."""
    from .patches import ChainedBlockPatch

    if isinstance(patch, ChainedBlockPatch):
        outer, inner = _strip_block_patch(patch.outer), _strip_block_patch(patch.inner)
        if outer is None or inner is None:
            return outer or inner
        return ChainedBlockPatch(outer, inner)
    return None if _is_ours(patch) else patch


def portable_model_options(model_options: dict) -> dict:
    """model_options without our hooks (the worker re-applies features from
    `transformer_options["para_attn"]`). Not pickled here: `pickle_payload` names the first
    entry that cannot travel (`check_model_options`) only if the payload fails to pickle."""
    options = copy.copy(model_options)
    # ComfyUI's per-run copy of every wrapper and callback (`prepare_model_patcher` fills it
    # in, also in the worker). It holds ours too: Compile Model's wrapper references the
    # compiled blocks, so keeping it pickled the whole model's weights into every payload.
    options.pop("to_load_options", None)
    to = dict(options.get("transformer_options", {}))
    options["transformer_options"] = to
    for kind in ("wrappers", "callbacks"):
        if kind in to:
            to[kind] = {
                call: {k: v for k, v in by_key.items() if not str(k).startswith(OUR_PREFIX)}  # add_wrapper: key None
                for call, by_key in to[kind].items()
            }
    if "patches_replace" in to:
        replaced = {}
        for name, patches in to["patches_replace"].items():
            kept = {key: _strip_block_patch(p) for key, p in patches.items()}
            replaced[name] = {key: p for key, p in kept.items() if p is not None}
        to["patches_replace"] = replaced
    if "patches" in to:
        to["patches"] = {name: [p for p in ps if not _is_ours(p)] for name, ps in to["patches"].items()}
    if _is_ours(to.get("optimized_attention_override")):
        del to["optimized_attention_override"]
    for key in [k for k in to if str(k).startswith(OUR_PREFIX) and k != OUR_PREFIX]:
        del to[key]  # live run state
    return options


def check_model_options(options: dict) -> None:
    """NotPortableError naming the first entry of `options` that does not pickle."""
    for key, value in options.items():
        if key == "transformer_options":
            for tkey, tvalue in value.items():
                _check_picklable(f"transformer_options[{tkey!r}]", tvalue)
        else:
            _check_picklable(f"model_options[{key!r}]", value)


def check_object_patches(patches: dict) -> None:
    """NotPortableError naming the first object patch that does not pickle."""
    for name, value in patches.items():
        _check_picklable(f"object patch {name!r}", value)


def portable_object_patches(object_patches: dict) -> dict:
    """Other nodes' object patches; ours are left out (the worker's features re-create them).
    An instance of a class ComfyUI's ModelSampling nodes define inside their function travels
    by `refs.dumps` (its bases and state); the rest is checked by `check_object_patches` if the
    payload fails to pickle."""
    return {name: value for name, value in object_patches.items()
            if not _is_ours(value, "comfy_para_attn.")}  # FP8 Quantize's GELU fusion lives in comfy_para_attn.quant


_GUIDER_LIVE_ATTRS = ("model_patcher", "model_options", "inner_model", "conds", "original_conds", "loaded_models")


def portable_guider(guider) -> tuple[ObjectRef, dict]:
    """The guider's class and plain attributes (cfg etc.), without model or conds."""
    state = {k: v for k, v in guider.__dict__.items() if k not in _GUIDER_LIVE_ATTRS}
    for name, value in state.items():
        if refs.looks_like_a_model(value):
            raise NotPortableError(
                f"Context Parallel does not support a guider with a second model yet ({type(guider).__name__}."
                f"{name}, newer ComfyUI's dual-model guider): use one model, or run without Context Parallel.")
    cls = ObjectRef(type(guider))
    _check_picklable(f"the guider ({type(guider).__name__})", (cls, state))
    return cls, state


def rebuild_guider(guider_cls: "ObjectRef | type", state: dict, model_patcher, conds: dict):
    if isinstance(guider_cls, ObjectRef):
        guider_cls = guider_cls.resolve()
    guider = guider_cls.__new__(guider_cls)
    guider.__dict__.update(state)
    guider.model_patcher = model_patcher
    guider.model_options = model_patcher.model_options
    guider.original_conds = conds
    return guider


class PortableLocalSampler:
    """ComfyUI builds dpm_fast and dpm_adaptive as functions local to `comfy.samplers.ksampler`,
    which pickle cannot name: sent as the sampler's name and options, rebuilt by `ksampler`."""

    _SUFFIX = "_function"

    def __init__(self, sampler):
        function = sampler.sampler_function
        self.name = function.__name__[: -len(self._SUFFIX)]
        self.extra_options = sampler.extra_options
        self.inpaint_options = sampler.inpaint_options

    @classmethod
    def applies_to(cls, sampler) -> bool:
        function = getattr(sampler, "sampler_function", None)
        qualname = getattr(function, "__qualname__", "")
        return (getattr(function, "__module__", "") == "comfy.samplers" and qualname.startswith("ksampler.<locals>.")
                and qualname.endswith(cls._SUFFIX))

    def rebuild(self):
        import comfy.samplers

        return comfy.samplers.ksampler(self.name, self.extra_options, self.inpaint_options)


def portable_sampler(sampler):
    """The sampler itself where it pickles, else a recipe the worker rebuilds it from."""
    if not PortableLocalSampler.applies_to(sampler):
        _check_picklable("the sampler", sampler)
        return sampler
    recipe = PortableLocalSampler(sampler)
    _check_picklable(f"the options of sampler {recipe.name!r}", recipe)
    return recipe


def rebuild_sampler(sampler):
    return sampler.rebuild() if isinstance(sampler, PortableLocalSampler) else sampler


def pickle_payload(payload: dict, parts: dict, pack=None) -> bytes:
    """`payload` pickled once, for `Pool.run(job, Pickled(...))`, as `pack(payload)` (an
    envelope of `pool.sent_once`) if given. The conds, a LoRA's patches and tensors in the
    model options can be large: checking each part on its own first pickled them twice per
    prompt. If pickling fails, the first of `parts` ({key: what it is, or a function that
    raises NotPortableError naming what in it cannot travel}) that cannot travel is named."""
    try:
        return refs.dumps(payload if pack is None else pack(payload))
    except Exception as exc:  # pickle raises many types for unpicklable objects
        for key, what in parts.items():
            if callable(what):
                what(payload[key])
            else:
                _check_picklable(what, payload[key])
        raise NotPortableError(
            f"Context Parallel cannot send the job to its workers ({type(exc).__name__}: {exc})."
        ) from None
