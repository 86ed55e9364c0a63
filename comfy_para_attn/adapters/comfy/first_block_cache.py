"""First Block Cache for ComfyUI's Flux, HunyuanVideo and Wan diffusion models.

Hooks (no forward function is copied):
- a `patches_replace["dit"]` patch on every block, chained with `chain_block_patch` so other
  block patches keep working. The first block's patch runs the block and asks the state
  machine (`comfy_para_attn.cache`) whether to reuse; on a hit the middle blocks pass their
  input through, and the last block's patch returns first-block output + cached tail residual;
  on a miss every block runs and the last block's patch stores the new tail residual;
- a keyed `OUTER_SAMPLE` wrapper that creates the run's state (a fresh cache per sampling
  run), frees every buffer when the run ends, and logs the reuse count.

Settings live in `transformer_options["para_attn"]["first_block_cache"]` (a picklable
`FirstBlockCacheSettings`); the live run state at `transformer_options["para_attn_fbcache"]`
exists only while a sampling run is in progress. Outside a run the patches are transparent.

Model calls are told apart by `transformer_options["cond_or_uncond"]` and `["uuids"]` (each
batch layout keeps its own buffers) and grouped into steps by `transformer_options["sigmas"]`.
Under context parallelism (`transformer_options["para_attn_cp"].all_reduce_sum`) the decision
is all-reduced, so every rank takes the same branch. Apply this feature BEFORE the context
parallel patches, so that its block patches are inner and see each rank's shards.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ...cache import FirstBlockCache, FirstBlockCacheSettings
from .device_conds import keep_conds_on_device
from .patches import block_keys, chain_block_patch, model_family, text_first

FEATURE = "first_block_cache"
STATE_KEY = "para_attn_fbcache"
CP_KEY = "para_attn_cp"
WRAPPER_KEY = "para_attn_first_block_cache"

log = logging.getLogger(__name__)


def _join(streams: dict, text_first: bool) -> torch.Tensor:
    """The last block's stream made from the first block's streams, when the last block is a
    single-stream block (the model's token order of `torch.cat((..), 1)` in forward_orig)."""
    order = ("txt", "img") if text_first else ("img", "txt")
    return torch.cat([streams[name] for name in order], 1)


class _Call:
    __slots__ = ("part", "streams", "hit")

    def __init__(self, part, streams: dict, hit: bool):
        self.part, self.streams, self.hit = part, streams, hit


def _block_patches_signature(transformer_options: dict) -> tuple:
    """Which block patches this call runs. Calls of one step with the same conds can still
    differ in them: Skip Layer Guidance's extra call skips some blocks, and its tail must not
    stand in for the full model's (nor the other way round)."""
    dit = (transformer_options.get("patches_replace") or {}).get("dit") or {}
    return tuple(sorted((str(key), id(patch)) for key, patch in dit.items()))


class FirstBlockCacheRun:
    """Live state of one sampling run: the cache plus the model call in flight."""

    def __init__(self, settings: FirstBlockCacheSettings, model_sampling=None, *, text_first: bool):
        self.settings = settings
        self.text_first = text_first  # the model's joint-sequence order (`_join`)
        self.cache = FirstBlockCache(settings.residual_diff_threshold, settings.max_consecutive_hits)
        self.start_sigma = float("inf")
        self.end_sigma = float("-inf")
        if model_sampling is not None:
            self.start_sigma = float(model_sampling.percent_to_sigma(settings.start_percent))
            self.end_sigma = float(model_sampling.percent_to_sigma(settings.end_percent))
        self.current: Optional[_Call] = None

    # -- block roles -----------------------------------------------------------------------
    def first_block(self, args: dict, original, block_type: str) -> dict:
        if not self.settings.enabled:
            self.cache.skip_call()
            self.current = None
            return original(args)
        # Newer ComfyUI's blocks add their residuals to `img` in place (`img += ...`): the
        # input is kept to measure the block's residual against.
        block_input = args["img"].clone()
        out = original(args)
        to = args["transformer_options"]
        sigma = float(to["sigmas"].max()) if to.get("sigmas") is not None else None
        allowed = sigma is None or self.end_sigma <= sigma <= self.start_sigma
        # Context windows (ComfyUI's context handler) call the model once per window at one
        # sigma: each window is a part of its own, compared with its own last residual.
        window = tuple(getattr(to.get("context_window"), "index_list", None) or ())
        part = (tuple(to.get("cond_or_uncond") or ()), tuple(str(u) for u in to.get("uuids") or ()),
                _block_patches_signature(to), window)
        reduce_sum = getattr(to.get(CP_KEY), "all_reduce_sum", None)
        hit = self.cache.begin_call(part, sigma, out["img"] - block_input,
                                    allowed=allowed, reduce_sum=reduce_sum)
        # A copy to measure the tail against (on a miss) or to add it to (on a hit): ComfyUI
        # updates these tensors in place after this block, its blocks (`txt += ...` in
        # DoubleStreamBlock) on a miss and ControlNet residuals on both; aliased, a hit counted
        # the double blocks' residuals twice.
        streams = {k: out[k].clone() for k in ("img", "txt") if k in out}
        self.current = _Call(part, streams, hit)
        return out

    def _first_streams_as(self, call: _Call, block_type: str) -> dict:
        """The first block's output in the layout of the last block's output."""
        if block_type == "single_block":
            return {"img": _join(call.streams, self.text_first)}
        return call.streams  # a double block (Wan's blocks are all "double_block")

    def last_block(self, args: dict, original, block_type: str) -> dict:
        call, self.current = self.current, None  # drop the first block's output after this
        if call is None:
            return original(args)
        if call.hit:
            tail = self.cache.tail(call.part)
            base = self._first_streams_as(call, block_type)
            return {k: base[k] + tail[k] for k in tail}
        out = original(args)
        base = self._first_streams_as(call, block_type)
        self.cache.end_call(call.part, {k: out[k] - base[k] for k in base})
        return out

    def middle_block(self, args: dict, original, block_type: str) -> dict:
        if self.current is not None and self.current.hit:
            return {k: args[k] for k in ("img", "txt") if k in args}
        return original(args)


class FirstBlockCachePatch:
    """The `patches_replace["dit"]` patch of one block; stateless (state is per run)."""

    def __init__(self, role: str, block_type: str):
        assert role in ("first", "middle", "last")
        self.role = role
        self.block_type = block_type

    def __call__(self, args: dict, extra: dict) -> dict:
        original = extra["original_block"]
        run = (args.get("transformer_options") or {}).get(STATE_KEY)
        if run is None:  # not inside a sampling run of a model patched by us
            return original(args)
        return getattr(run, f"{self.role}_block")(args, original, self.block_type)

    def __repr__(self):
        return f"FirstBlockCachePatch({self.role!r}, {self.block_type!r})"


def _outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE: a fresh cache for this run; free it and log when the run ends."""
    import comfy.model_patcher

    guider = executor.class_obj
    orig_model_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig_model_options)
    to = guider.model_options.setdefault("transformer_options", {})
    settings = to.get("para_attn", {}).get(FEATURE)
    if settings is None:
        guider.model_options = orig_model_options
        return executor(*args, **kwargs)
    patcher = guider.model_patcher
    run = FirstBlockCacheRun(settings, patcher.get_model_object("model_sampling"), text_first=text_first(patcher))
    to[STATE_KEY] = run
    try:
        return executor(*args, **kwargs)
    finally:
        logging.info("First Block Cache: %s", run.cache.summary())
        run.cache.free()
        run.current = None
        guider.model_options = orig_model_options


def apply_first_block_cache(model_patcher, settings: FirstBlockCacheSettings):
    """Return a clone of `model_patcher` with First Block Cache configured by `settings`.

    The single entry point for the node and for pool workers. Applying it again to a model
    that already has it only replaces the settings (the patches read them at run time).
    Raises ValueError for an unsupported model.
    """
    import comfy.patcher_extension

    try:
        family = model_family(model_patcher)
    except ValueError as exc:
        if settings.enabled:
            raise
        log.info("First Block Cache is off (threshold 0), so this model passes through: %s", exc)  # a no-op toggle
        return model_patcher
    keys = block_keys(model_patcher)
    if len(keys) < 2:
        raise ValueError("First Block Cache needs a model with at least two transformer blocks.")
    model = model_patcher.clone()
    keep_conds_on_device(model)
    to = model.model_options.setdefault("transformer_options", {})
    to["para_attn"] = {**to.get("para_attn", {}), FEATURE: settings}
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    if model.get_wrappers(outer, WRAPPER_KEY):
        return model
    for pos, (kind, index) in enumerate(keys):
        role = "first" if pos == 0 else "last" if pos == len(keys) - 1 else "middle"
        chain_block_patch(model, kind, index, FirstBlockCachePatch(role, kind))
    model.add_wrapper_with_key(outer, WRAPPER_KEY, _outer_sample_wrapper)
    log.debug("First Block Cache on %s (%d blocks): %s", family, len(keys), settings)
    return model
