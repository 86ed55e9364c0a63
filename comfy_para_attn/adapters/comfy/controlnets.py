"""ControlNets that travel to the pool's workers (Context Parallel with a ControlNet, FLUX).

A cond's `control` is a chain of ComfyUI ControlNet objects (`previous_controlnet`). They
pickle as they are but for two parts, which `portable_controls` replaces in shallow copies
(the graph's own objects stay untouched) and `rebuild_controls` puts back in the worker:
- a lambda that is the default of the class's `__init__` (ControlNet's `preprocess_image`):
  a `ClassDefault` marker, the worker's own default put back;
- the VAE that encodes the hint (InstantX / Union ControlNets): the recipe Parallel VAE
  Decode publishes (weights in /dev/shm once: the same file when the graph decodes with
  that VAE), rebuilt and cached by the worker.
A hint cached from an earlier in-process run is dropped (the workers compute their own); the
control model's weights travel with the job, once (`pool.sent_once`). A ControlNet shared by
several conds stays one object in the worker. Each control model gets a key that names the
controller's module object (a token per live module, its patches, a token of each weight):
a worker keeps the model of the last prompt's ControlNets, loaded on its GPU, and gives it to
the next prompt's ControlNets with the same key (`keep_loaded_models`), as ComfyUI keeps a
ControlNet loaded between prompts in-process. How the residuals then meet each rank's tokens:
`context_parallel._local_control`.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import uuid
import weakref
from typing import Callable

import torch

log = logging.getLogger(__name__)


class ClassDefault:
    """Stands for an attribute that held its class's `__init__` default (a lambda)."""

    def __init__(self, name: str):
        self.name = name


MODEL_KEY = "_para_attn_model_key"  # attribute of a travelling ControlNet: `_model_key`
_model_tokens: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def _model_key(control):
    """What names a ControlNet's model across prompts: a token for the module object (new for
    every module, even one at a dead module's address), its patches, and a token of each
    weight (`sent_once.tensor_token`: identity, layout and a sample of values, since ComfyUI
    loads models under inference mode, where tensors have no version counter)."""
    import hashlib

    from ...pool.sent_once import tensor_token

    model = getattr(control, "control_model", None)
    if not isinstance(model, torch.nn.Module):
        return None
    token = _model_tokens.get(model)
    if token is None:
        token = _model_tokens[model] = uuid.uuid4().hex
    weights = hashlib.sha1()
    for name, tensor in model.state_dict(keep_vars=True).items():
        weights.update(f"{name}|{tensor_token(tensor)}|".encode())
    wrapped = getattr(control, "control_model_wrapped", None)
    return token, str(getattr(wrapped, "patches_uuid", "")), weights.hexdigest()


class PublishedVAE:
    """Stands for a ControlNet's VAE: what a worker needs to rebuild it (`vae_recipe`)."""

    def __init__(self, recipe: dict):
        self.recipe = recipe


@functools.lru_cache(maxsize=None)
def lambda_defaults(cls: type) -> dict:
    """{parameter: default} of the `__init__` parameters of `cls` (and its bases) whose
    default is a lambda, which pickle cannot send."""
    found = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        try:
            parameters = inspect.signature(init).parameters if init is not None else {}
        except (TypeError, ValueError):
            continue
        for name, parameter in parameters.items():
            default = parameter.default
            if callable(default) and getattr(default, "__name__", "") == "<lambda>":
                found.setdefault(name, default)
    return found


def _chain(control):
    while control is not None:
        yield control
        control = getattr(control, "previous_controlnet", None)


def _unload_here(patcher) -> None:
    """Take a ControlNet's model off ComfyUI's GPU (it runs in the workers now; an earlier
    in-process run left it loaded): ComfyUI's own unload, as its `free_memory` does, returns
    the module to its offload device with no load state, as the workers must get it."""
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is patcher and mm.current_loaded_models[i].model_unload():
            mm.current_loaded_models.pop(i)


_warned_on_gpu: set = set()


def _check_on_host(control) -> None:
    model = getattr(control, "control_model", None)
    if not isinstance(model, torch.nn.Module):
        return
    on_gpu = sum(t.numel() * t.element_size() for t in model.state_dict().values() if t.device.type != "cpu")
    if on_gpu and id(model) not in _warned_on_gpu:
        _warned_on_gpu.add(id(model))
        log.warning("Context Parallel: this ControlNet's weights stay on the GPU (ComfyUI's --highvram or "
                    "--gpu-only keep models there), so %.2f GiB travel to the workers with every prompt "
                    "instead of once.", on_gpu / 2**30)


def _model_patchers(conds: dict) -> dict:
    """{id: ModelPatcher} of every ControlNet model in `conds`' chains, each once."""
    patchers = {}
    for items in conds.values():
        for cond in items:
            control = cond.get("control") if isinstance(cond, dict) else None
            for patcher in control.get_models() if control is not None else ():  # the whole chain's
                patchers[id(patcher)] = patcher
    return patchers


def portable_controls(conds: dict, vae_recipe: Callable) -> dict:
    """`conds` (prompt type -> list of cond dicts) with every ControlNet chain made portable;
    `vae_recipe(vae)` publishes a VAE and returns its recipe. New dicts; cond dicts without a
    ControlNet are passed on as they are. Raises NotPortableError for what cannot travel."""
    from .portable import NotPortableError

    copies: dict = {}  # id(original) -> portable copy: shared objects stay shared
    recipes: dict = {}  # id(vae) -> its recipe (published once per job)

    def portable(control):
        if control is None:
            return None
        if id(control) in copies:
            return copies[id(control)]
        if getattr(control, "extra_hooks", None) is not None:
            raise NotPortableError("Context Parallel does not support ControlNet hooks yet.")
        _check_on_host(control)
        clone = copies[id(control)] = copy.copy(control)
        setattr(clone, MODEL_KEY, _model_key(control))
        for name, default in lambda_defaults(type(control)).items():
            if getattr(clone, name, None) is default:
                setattr(clone, name, ClassDefault(name))
        vae = getattr(clone, "vae", None)
        if vae is not None:
            if id(vae) not in recipes:
                recipes[id(vae)] = PublishedVAE(vae_recipe(vae))
                if len({r.recipe["fingerprint"] for r in recipes.values()}) > 1:
                    # The workers keep one VAE in /dev/shm: publishing the second evicts the first.
                    raise NotPortableError("Context Parallel supports ControlNets with one VAE per prompt; give "
                                           "every ControlNet of this prompt the same VAE.")
            clone.vae = recipes[id(vae)]
        if getattr(clone, "cond_hint", None) is not None:
            clone.cond_hint = None
        clone.previous_controlnet = portable(getattr(control, "previous_controlnet", None))
        return clone

    for patcher in _model_patchers(conds).values():
        _unload_here(patcher)
    out = {kind: [dict(cond, control=portable(cond["control"]))
                  if isinstance(cond, dict) and cond.get("control") is not None else cond for cond in items]
           for kind, items in conds.items()}
    log.info("Context Parallel: %d ControlNet(s)%s go with this prompt; every rank runs them on the whole latent",
             len(copies), f" and {len(recipes)} hint VAE(s)" if recipes else "")
    return out


def has_controls(conds: dict) -> bool:
    return any(isinstance(cond, dict) and cond.get("control") is not None
               for items in conds.values() for cond in items)


def controls_model_bytes(conds: dict) -> int:
    """Bytes of the ControlNet models and hint VAEs sampling `conds` loads (each once), next to
    the diffusion model. Counted at every prompt, although the workers keep the last prompt's
    ControlNet models loaded (`keep_loaded_models`): room made for them may be room they have."""
    patchers = _model_patchers(conds)
    for control in _each_control(conds):
        vae_patcher = getattr(getattr(control, "vae", None), "patcher", None)
        if vae_patcher is not None:
            patchers[id(vae_patcher)] = vae_patcher
    return sum(patcher.model_size() for patcher in patchers.values())


def _each_control(conds: dict):
    """Every ControlNet object of `conds`' chains, once."""
    seen = set()
    for items in conds.values():
        for cond in items:
            for control in _chain(cond.get("control") if isinstance(cond, dict) else None):
                if id(control) in seen:
                    break
                seen.add(id(control))
                yield control


def rebuild_controls(conds: dict, load_vae: Callable) -> dict:
    """Worker side: put back what `portable_controls` replaced, in place; `load_vae(recipe)`
    returns the rebuilt VAE. Returns `conds`."""
    for control in _each_control(conds):
        for name, value in list(vars(control).items()):
            if isinstance(value, ClassDefault):
                setattr(control, name, lambda_defaults(type(control))[value.name])
            elif isinstance(value, PublishedVAE):
                setattr(control, name, load_vae(value.recipe))
    return conds


def keep_loaded_models(conds: dict, kept: dict) -> tuple[int, int, int]:
    """Worker side: give each ControlNet of `conds` the model (module and ModelPatcher) kept
    from the last prompt under the same key, instead of the copy this job brought; then keep
    this prompt's models in `kept` (the worker's cache) and nothing else. Returns (models kept
    from the last prompt, of them still loaded in ComfyUI here, models new to this worker)."""
    import comfy.model_management as mm

    used, reused = {}, set()
    for control in _each_control(conds):
        key = vars(control).pop(MODEL_KEY, None)
        if key is None or getattr(control, "control_model_wrapped", None) is None:
            continue
        entry = used.get(key) or kept.get(key)
        if entry is None:
            entry = (control.control_model, control.control_model_wrapped)
        elif key in kept:
            reused.add(key)
        control.control_model, control.control_model_wrapped = entry
        used[key] = control.control_model, control.control_model_wrapped
    kept.clear()
    kept.update(used)
    loaded = {id(m.model) for m in mm.current_loaded_models}
    still_loaded = sum(id(used[key][1]) in loaded for key in reused)
    return len(reused), still_loaded, len(used) - len(reused)
