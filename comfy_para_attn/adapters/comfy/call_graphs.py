"""Compile Model's `cuda_graph = "model call"`: ComfyUI model calls replayed as CUDA graphs.

A graph replays what the capture did, so a call is graphed only when nothing in it decides
per step on the host. `why_not_graphed` names what keeps a call eager: block patches (First
Block Cache's reuse decision, Context Parallel, other packs' patches), a ControlNet, other
wrappers of the model call (EasyCache and the like), LoRA hooks (they change weights during
sampling), a partly offloaded model (lowvram casts weights per layer from host memory). The
reason is logged once per wrapper.

The weights are checked at the first call of every sampling run (ComfyUI's ON_PRE_RUN) and
the graphs dropped when they moved (a different LoRA, a reload); ComfyUI unloading the model
(ON_DETACH with `unpatch_all`) frees the graphs' memory.
"""
from __future__ import annotations

import logging

from ...call_graphs import CallGraphs, NotGraphable, weights_token

CALLBACK_KEY = "para_attn_call_graphs"
APPLY_MODEL_ARGS = ("x", "t", "c_concat", "c_crossattn", "control", "transformer_options")

log = logging.getLogger(__name__)


# transformer_options entries that change with every call and that a graphed call does not
# read (the per-step sigmas, the conds' ids) or that `why_not_graphed` has checked already.
VOLATILE_OPTIONS = ("sigmas", "sample_sigmas", "uuids", "wrappers", "callbacks", "patches", "patches_replace")


class _Same:
    """Keys an object by identity and keeps it alive, so a new object at a dead one's address
    is never taken for it."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj


def _frozen(value):
    import torch

    if isinstance(value, dict):
        return ("dict",) + tuple(sorted(((str(k), _frozen(v)) for k, v in value.items()), key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)):
        return ("seq",) + tuple(_frozen(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, str(value.device), value.data_ptr())
    try:
        hash(value)
        return value
    except TypeError:
        return _Same(value)


def options_key(options: dict) -> tuple:
    """What of `transformer_options` a graph depends on: everything but `VOLATILE_OPTIONS`
    (ComfyUI makes a new dict per call; the values inside are compared: our nodes' settings,
    an attention override, `cond_or_uncond`). Another attention backend on a clone that shares
    this Compile Model's wrapper is another graph, not a replay of the old one."""
    return _frozen({k: v for k, v in options.items() if k not in VOLATILE_OPTIONS})


def patches_key(base_model) -> tuple:
    """The model's object patches as applied for this run (ComfyUI swaps `model_sampling` and
    other attributes per clone with no weight moving), by identity: a graph covers
    `_apply_model`'s model-sampling arithmetic and whatever a patched forward does. Read at
    a run's first call, with the weights: ComfyUI applies object patches when it loads."""
    patcher = getattr(base_model, "current_patcher", None)
    patches = getattr(patcher, "object_patches", None) or {}
    return (_Same(getattr(base_model, "model_sampling", None)),
            tuple((name, _Same(patches[name])) for name in sorted(patches)))


def _nonempty(value) -> bool:
    if isinstance(value, dict):
        return any(_nonempty(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return len(value) > 0
    return value is not None


def other_model_wrappers(options: dict, own_wrapper_key: str, harmless=lambda fn: False) -> list:
    """Keys of the APPLY_MODEL wrappers other than ours and of the DIFFUSION_MODEL wrappers
    in `options`, leaving out wrappers for which `harmless(fn)` holds."""
    wrappers = options.get("wrappers", {})
    keys = [key for key, fns in wrappers.get("apply_model", {}).items()
            if key != own_wrapper_key and not all(harmless(fn) for fn in fns)]
    return keys + [key for key, fns in wrappers.get("diffusion_model", {}).items() if not all(harmless(fn) for fn in fns)]


def why_not_fixed(base_model) -> str | None:
    """Why a run's model calls may not compute with what they computed before (a graph, rows
    made at its start): hooks change weights during it, gradients are being recorded."""
    import torch

    patcher = getattr(base_model, "current_patcher", None)
    if patcher is not None and getattr(patcher, "current_hooks", None) is not None:
        return "hooks (scheduled LoRAs) can change the weights during sampling"
    if torch.is_grad_enabled():
        return "gradients are enabled"
    return None


def why_not_graphed(base_model, args: tuple, kwargs: dict, own_wrapper_key: str):
    """None if this APPLY_MODEL call can be replayed as a CUDA graph, else the reason."""
    import torch

    if len(args) != len(APPLY_MODEL_ARGS):
        return "an unexpected apply_model call"
    x, _, _, _, control, options = args
    if control is not None:
        return "a ControlNet is applied"
    options = options if isinstance(options, dict) else {}
    if _nonempty(options.get("patches")) or _nonempty(options.get("patches_replace")):
        return "block patches are installed (First Block Cache, Context Parallel or another node's)"
    others = other_model_wrappers(options, own_wrapper_key)
    if others:
        return f"other nodes wrap the model call ({', '.join(map(str, others))})"
    if getattr(base_model, "model_lowvram", False):
        return "the model is partly offloaded to the CPU (lowvram)"
    reason = why_not_fixed(base_model)
    if reason is not None:
        return reason
    if not isinstance(x, torch.Tensor) or x.device.type != "cuda":
        return "the model does not run on a CUDA device"
    return None


class ModelCallGraphs:
    """Graphs of one compiled model's APPLY_MODEL calls, with ComfyUI's run boundaries."""

    def __init__(self, own_wrapper_key: str):
        self.own_wrapper_key = own_wrapper_key
        self.graphs = CallGraphs("Compile Model (cuda_graph 'model call')")
        self._check_weights = True
        self._patches = ()  # patches_key of this run: object patches change only at a load
        self._logged = set()

    def on_pre_run(self, model_patcher) -> None:
        self._check_weights = True

    def on_detach(self, model_patcher, unpatch_all=True) -> None:
        # Every run detaches the loaded model with unpatch_all=False and loads it again, weights
        # in place (the weights check at the run's first call covers that); True unloads it.
        if unpatch_all:
            self.graphs.reset()
        self._check_weights = True

    def __call__(self, run, base_model, args: tuple, kwargs: dict, extra=None):
        """`run(*args, **kwargs)`, from a CUDA graph where the call allows it; `extra` goes
        into the graph's key (what else the call reads that the caller set up)."""
        reason = why_not_graphed(base_model, args, kwargs, self.own_wrapper_key)
        if reason is not None and getattr(base_model, "model_lowvram", False):
            self.graphs.reset()  # memory is short: give the graphs' memory back
        if reason is None:
            if self._check_weights:
                # the whole BaseModel: the diffusion model's weights and model sampling's tables
                self.graphs.check_weights(weights_token(base_model))
                self._patches = patches_key(base_model)
                self._check_weights = False
            x, t, c_concat, c_crossattn, control, options = args

            def call(positional, extra_conds):
                return run(*positional, control, options, **extra_conds)

            try:
                return self.graphs(call, ((x, t, c_concat, c_crossattn), kwargs),
                                   extra=(options_key(options), self._patches, extra))
            except NotGraphable as e:  # raised before anything ran
                reason = str(e)
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("Compile Model: model calls run without a CUDA graph: %s", reason)
        return run(*args, **kwargs)

    def register(self, model_patcher) -> None:
        import comfy.patcher_extension as ext

        for kind, fn in ((ext.CallbacksMP.ON_PRE_RUN, self.on_pre_run), (ext.CallbacksMP.ON_DETACH, self.on_detach)):
            model_patcher.remove_callbacks_with_key(kind, CALLBACK_KEY)
            model_patcher.add_callback_with_key(kind, CALLBACK_KEY, fn)


def unregister(model_patcher) -> None:
    import comfy.patcher_extension as ext

    for kind in (ext.CallbacksMP.ON_PRE_RUN, ext.CallbacksMP.ON_DETACH):
        model_patcher.remove_callbacks_with_key(kind, CALLBACK_KEY)
