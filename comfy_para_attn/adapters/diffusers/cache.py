"""First Block Cache for diffusers' FluxTransformer2DModel and HunyuanVideoTransformer3DModel.

The same state machine as the ComfyUI adapter (`comfy_para_attn.cache`). Hooks: each block of
`transformer_blocks` and `single_transformer_blocks` gets an instance-level `forward`
override (removed by `remove_cache`, state_dict keys unchanged), and the transformer gets a
forward pre-hook that reads the call's `timestep`. No diffusers forward is copied.

Blocks take `(hidden_states, encoder_hidden_states, ...)` and return both streams (Flux:
`(encoder, hidden)`, HunyuanVideo: `(hidden, encoder)`). On a hit the first block runs, the
middle blocks hand their inputs back, and the last block returns first-block output + the
tail residual stored at the last computed step, per stream.

Steps are told apart by `timestep`; several calls at one timestep (a pipeline that runs
cond and uncond separately) are parts of one step: the first call decides, each part keeps
its own buffers. A rising timestep resets the cache; call `reset_cache` between prompts to
free its buffers. Under context parallelism pass `reduce_sum` (sum over the ranks).
"""
from __future__ import annotations

import inspect
from typing import Optional, Union

import torch

from ...cache import FirstBlockCache, FirstBlockCacheSettings
from ...cache.state import ReduceSum

_ATTR = "_para_attn_fbcache"
# class name -> position of the image stream in a block's returned tuple
_FAMILIES = {"FluxTransformer2DModel": 1, "HunyuanVideoTransformer3DModel": 0}


class DiffusersCacheRun:
    """Cache state attached to one transformer."""

    def __init__(self, cache: FirstBlockCache, img_index: int, reduce_sum: Optional[ReduceSum]):
        self.cache = cache
        self.img_index = img_index
        self.reduce_sum = reduce_sum
        self.step: Optional[float] = None
        self.part = 0  # index of the model call within the current step
        self.current = None  # (part, {"img", "txt"} of the first block's output, hit)

    def _pack(self, img: torch.Tensor, txt: torch.Tensor) -> tuple:
        return (txt, img) if self.img_index == 1 else (img, txt)

    def pre_forward(self, timestep) -> None:
        step = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else timestep
        self.part = self.part + 1 if step is not None and step == self.step else 0
        self.step = step
        self.current = None

    def first(self, forward, args, kwargs):
        img_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = forward(*args, **kwargs)
        img, txt = out[self.img_index], out[1 - self.img_index]
        hit = self.cache.begin_call(self.part, self.step, img - img_in, reduce_sum=self.reduce_sum)
        if not hit:  # the next blocks may update their inputs in place: keep a copy
            img, txt = img.clone(), txt.clone()
        self.current = (self.part, {"img": img, "txt": txt}, hit)
        return out

    def middle(self, forward, args, kwargs):
        if self.current is not None and self.current[2]:
            img = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            txt = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
            return self._pack(img, txt)
        return forward(*args, **kwargs)

    def last(self, forward, args, kwargs):
        current, self.current = self.current, None
        if current is None:
            return forward(*args, **kwargs)
        part, first, hit = current
        if hit:
            tail = self.cache.tail(part)
            return self._pack(first["img"] + tail["img"], first["txt"] + tail["txt"])
        out = forward(*args, **kwargs)
        img, txt = out[self.img_index], out[1 - self.img_index]
        self.cache.end_call(part, {"img": img - first["img"], "txt": txt - first["txt"]})
        return out


def _blocks(transformer) -> list:
    return list(transformer.transformer_blocks) + list(getattr(transformer, "single_transformer_blocks", []))


def _family_img_index(transformer) -> int:
    name = type(transformer).__name__
    if name not in _FAMILIES:
        raise ValueError(f"apply_cache supports diffusers' {' and '.join(_FAMILIES)}, not {name}.")
    for block in _blocks(transformer):
        if "encoder_hidden_states" not in inspect.signature(block.forward).parameters:
            raise ValueError(f"{type(block).__name__} does not take encoder_hidden_states: this diffusers "
                             "version keeps its single blocks on one joined stream; upgrade diffusers.")
    return _FAMILIES[name]


def apply_cache(transformer, residual_diff_threshold: Union[float, FirstBlockCacheSettings] = 0.12, *,
                max_consecutive_hits: int = -1, reduce_sum: Optional[ReduceSum] = None) -> DiffusersCacheRun:
    """Add First Block Cache to a diffusers Flux / HunyuanVideo transformer (in place).

    `residual_diff_threshold` may be a `FirstBlockCacheSettings` (its start/end percent must
    be 0 and 1: diffusers pipelines do not tell a model call where it is in the schedule).
    Returns the run state (`.cache.hits`, `.cache.calls`). Applying again replaces it.
    """
    if isinstance(residual_diff_threshold, FirstBlockCacheSettings):
        settings = residual_diff_threshold
        if (settings.start_percent, settings.end_percent) != (0.0, 1.0):
            raise ValueError("The diffusers adapter does not support start_percent/end_percent.")
    else:
        settings = FirstBlockCacheSettings(float(residual_diff_threshold), max_consecutive_hits=max_consecutive_hits)
    remove_cache(transformer)  # first: the checks below read the blocks' own forward
    img_index = _family_img_index(transformer)
    blocks = _blocks(transformer)
    if len(blocks) < 2:
        raise ValueError("First Block Cache needs a transformer with at least two blocks.")
    run = DiffusersCacheRun(FirstBlockCache(settings.residual_diff_threshold, settings.max_consecutive_hits),
                            img_index, reduce_sum)
    if not settings.enabled:  # threshold 0 / no hits allowed: leave the model untouched
        setattr(transformer, _ATTR, (run, None, []))
        return run
    # A block's own forward may be another wrapper (diffusers' hooks, group offloading): kept
    # under ours and put back by remove_cache.
    saved = [(block, block.__dict__.get("forward")) for block in blocks]
    for pos, block in enumerate(blocks):
        role = run.first if pos == 0 else run.last if pos == len(blocks) - 1 else run.middle
        original = block.forward

        def forward(*args, _role=role, _original=original, **kwargs):
            return _role(_original, args, kwargs)

        block.forward = forward
    signature = inspect.signature(transformer.forward)

    def pre_hook(module, args, kwargs):
        run.pre_forward(signature.bind_partial(*args, **kwargs).arguments.get("timestep"))

    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    setattr(transformer, _ATTR, (run, handle, saved))
    return run


def reset_cache(transformer) -> None:
    """Free the buffers and start from a clean cache (call between prompts)."""
    entry = getattr(transformer, _ATTR, None)
    if entry is not None:
        run = entry[0]
        run.cache.free()
        run.step, run.part, run.current = None, 0, None


def remove_cache(transformer) -> None:
    """Undo `apply_cache`."""
    entry = getattr(transformer, _ATTR, None)
    if entry is None:
        return
    _run, handle, saved = entry
    if handle is not None:
        handle.remove()
    for block, previous in saved:
        if previous is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = previous
    delattr(transformer, _ATTR)
