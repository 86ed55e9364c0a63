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
several conds stays one object in the worker. How the residuals then meet each rank's tokens:
`context_parallel._local_control`.
"""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Callable


class ClassDefault:
    """Stands for an attribute that held its class's `__init__` default (a lambda)."""

    def __init__(self, name: str):
        self.name = name


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


def portable_controls(conds: dict, vae_recipe: Callable) -> dict:
    """`conds` (prompt type -> list of cond dicts) with every ControlNet chain made portable;
    `vae_recipe(vae)` publishes a VAE and returns its recipe. New dicts; cond dicts without a
    ControlNet are passed on as they are."""
    copies: dict = {}  # id(original) -> portable copy: shared objects stay shared
    recipes: dict = {}  # id(vae) -> its recipe (published once per job)

    def portable(control):
        if control is None:
            return None
        if id(control) in copies:
            return copies[id(control)]
        clone = copies[id(control)] = copy.copy(control)
        for name, default in lambda_defaults(type(control)).items():
            if getattr(clone, name, None) is default:
                setattr(clone, name, ClassDefault(name))
        vae = getattr(clone, "vae", None)
        if vae is not None:
            if id(vae) not in recipes:
                recipes[id(vae)] = PublishedVAE(vae_recipe(vae))
            clone.vae = recipes[id(vae)]
        if getattr(clone, "cond_hint", None) is not None:
            clone.cond_hint = None
        clone.previous_controlnet = portable(getattr(control, "previous_controlnet", None))
        return clone

    return {kind: [dict(cond, control=portable(cond["control"]))
                   if isinstance(cond, dict) and cond.get("control") is not None else cond for cond in items]
            for kind, items in conds.items()}


def has_controls(conds: dict) -> bool:
    return any(isinstance(cond, dict) and cond.get("control") is not None
               for items in conds.values() for cond in items)


def controls_model_bytes(conds: dict) -> int:
    """Bytes of the ControlNet models sampling `conds` loads (each model once): the workers
    load them at every prompt, next to the diffusion model."""
    patchers = {}
    for items in conds.values():
        for cond in items:
            control = cond.get("control") if isinstance(cond, dict) else None
            for patcher in control.get_models() if control is not None else ():  # the whole chain's
                patchers[id(patcher)] = patcher
    return sum(patcher.model_size() for patcher in patchers.values())


def rebuild_controls(conds: dict, load_vae: Callable) -> dict:
    """Worker side: put back what `portable_controls` replaced, in place; `load_vae(recipe)`
    returns the rebuilt VAE. Returns `conds`."""
    seen = set()
    for items in conds.values():
        for cond in items:
            for control in _chain(cond.get("control") if isinstance(cond, dict) else None):
                if id(control) in seen:
                    break
                seen.add(id(control))
                for name, value in list(vars(control).items()):
                    if isinstance(value, ClassDefault):
                        setattr(control, name, lambda_defaults(type(control))[value.name])
                    elif isinstance(value, PublishedVAE):
                        setattr(control, name, load_vae(value.recipe))
    return conds
