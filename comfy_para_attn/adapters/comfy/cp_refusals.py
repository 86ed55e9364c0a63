"""What Context Parallel refuses, with a message that says what to change: checked by the node
before the weights travel (pool_sampling.py) and again where the workers install it."""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
import sys

import torch

from .patches import model_family


# Models whose blocks need all tokens of the sequence, where a rank holds a slice: not sharded yet.
_UNSHARDABLE = {
    "VaceWanModel": ("Wan VACE", "it adds residuals by token index"),
    "HumoWanModel": ("Wan HuMo", "its audio attention groups the tokens by frame"),
    "AnimateWanModel": ("Wan Animate", "its face adapter groups the tokens by frame"),
}


def refuse_unshardable(model_patcher) -> None:
    """ValueError for the models whose extra inputs need every token on one rank (checked
    by the node too, before the weights travel to the workers)."""
    dm = model_patcher.model.diffusion_model
    if type(dm).__name__ in _UNSHARDABLE:
        name, why = _UNSHARDABLE[type(dm).__name__]
        raise ValueError(f"Context Parallel does not support {name} yet ({why}); remove the Context Parallel "
                         "node for this model.")


# transformer_options["patches"] that newer ComfyUI's FLUX and Wan blocks hand every token or
# the full key/value set (its FluxKVCache, other packs' Wan block hooks): under sharded tokens
# they would see one rank's slice and silently change the result.
_TOKEN_PATCHES = ("attn1_patch", "attn2_patch", "double_block")


@functools.lru_cache(maxsize=None)
def _patches_read_in(module_names: frozenset) -> frozenset:
    """Which of `_TOKEN_PATCHES` the source of these (ComfyUI) modules reads: a model's blocks
    call them only in the ComfyUI versions whose block code looks them up."""
    source = ""
    for name in module_names:
        with contextlib.suppress(OSError, TypeError, KeyError):
            source += inspect.getsource(sys.modules[name])
    return frozenset(name for name in _TOKEN_PATCHES if re.search(_patch_lookup(name), source))


def _patch_lookup(name: str) -> str:
    """A lookup of the patch list itself (`"name" in patches`, `patches["name"]`); not the
    `("double_block", i) in blocks_replace` of block replacements, which every version has."""
    quoted = f"[\"']{name}[\"']"
    return rf"{quoted}\s+in\s+\w|\[{quoted}\]"


def refuse_token_patches(model_patcher) -> None:
    """ValueError for attention or block patches of other nodes that Context Parallel cannot
    shard, where the running ComfyUI's blocks of this model call them (only where tokens are
    split: cfg-only layouts run whole model calls)."""
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches", {})
    found = [name for name in _TOKEN_PATCHES if patches.get(name)]
    if found:
        modules = frozenset(type(m).__module__ for m in model_patcher.model.diffusion_model.modules()
                            if type(m).__module__.startswith("comfy."))
        found = [name for name in found if name in _patches_read_in(modules)]
    if found:
        raise ValueError(f"Context Parallel cannot split the tokens of a model with {', '.join(found)} patches "
                         "from another node (such as a KV cache or a block hook: they would see one GPU's share); "
                         "remove that node, or set the Context Parallel node to cfg_parallel only (ulysses 1, ring 1).")


def image_tokens(model_patcher, latent_shape) -> int:
    """How many image tokens the model makes of a latent (its patches, padded up)."""
    patch = getattr(model_patcher.model.diffusion_model, "patch_size", 2)
    spatial = tuple(latent_shape[2:])
    patch = (patch,) * len(spatial) if isinstance(patch, int) else tuple(patch)[-len(spatial):]
    return math.prod(-(-size // p) for size, p in zip(spatial, patch))


def refuse_too_few_tokens(model_patcher, latent_shape, conds: dict, sequence_size: int) -> None:
    """ValueError, before any worker runs, for an image or a prompt too short to give every
    rank of the sequence group a token of each stream it splits (a worker would fail inside
    ComfyUI's block on an empty shard). FLUX and HunyuanVideo split the text too; Wan does not.
    `conds`: the guider's conds by name (their `cross_attn` is the text)."""
    tokens = image_tokens(model_patcher, latent_shape)
    if tokens < sequence_size:
        raise ValueError(
            f"Context Parallel: this latent makes {tokens} image token(s), fewer than the {sequence_size} GPUs its "
            f"tokens are split over; use a larger image, fewer GPUs, or cfg_parallel (which does not split tokens).")
    if model_family(model_patcher) == "wan":
        return
    lengths = [(name, c["cross_attn"].shape[1]) for name, group in conds.items() for c in group
               if isinstance(c.get("cross_attn"), torch.Tensor) and c["cross_attn"].ndim == 3]
    name, shortest = min(lengths, key=lambda item: item[1], default=(None, sequence_size))
    if shortest < sequence_size:
        raise ValueError(
            f"Context Parallel: the {name} prompt encodes to {shortest} text token(s), fewer than the {sequence_size} "
            f"GPUs its tokens are split over (an empty prompt?); write a longer prompt, use fewer GPUs, or "
            f"cfg_parallel (which does not split tokens).")


def refuse_timestep_zero_references(model_patcher, conds: dict) -> None:
    """ValueError for reference latents with newer ComfyUI's "index_timestep_zero" method
    (FLUX.2 edits): the model computes their per-token modulation from the whole sequence's
    token ranges, which a rank's share does not have."""
    params = getattr(model_patcher.model.diffusion_model, "params", None)
    default = getattr(params, "default_ref_method", None)
    for group in conds.values():
        for c in group:
            if c.get("reference_latents") and c.get("reference_latents_method", default) == "index_timestep_zero":
                raise ValueError(
                    "Context Parallel cannot split the tokens of a model with reference latents of the "
                    "'index_timestep_zero' method; pick another reference method, or set the Context Parallel node "
                    "to cfg_parallel only (ulysses 1, ring 1).")
