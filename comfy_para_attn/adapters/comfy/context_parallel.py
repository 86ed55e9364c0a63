"""Install context parallelism into a ComfyUI ModelPatcher (runs inside each pool worker).

`install_context_parallel(patcher, cp)` returns a clone whose model calls shard their
tokens over `cp`'s sequence group (see sequence_parallel.py) and, with cfg parallelism,
send the cond and uncond halves of each batch to the two halves of the ranks. Every rank
ends each model call with the same full output, so the sampler's own arithmetic stays
identical on all ranks.

Apply First Block Cache (and other block patches) BEFORE this: our patches are chained
outermost, so the cache sees this rank's shards and agrees with the other ranks through
`transformer_options["para_attn_cp"].all_reduce_sum`.

What it refuses is in cp_refusals.py; how the ranks agree on ComfyUI's batching, in
agreed_memory.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...attention import ParallelContext
from ...attention.collectives import all_gather
from .agreed_memory import AgreedMemoryEstimate, AgreeWhileBatching
from .cp_refusals import refuse_token_patches, refuse_unshardable
from .device_conds import keep_conds_on_device
from .patches import ChainedBlockPatch, block_counts, chain_block_patch, model_family, text_first
from .sequence_parallel import ContextParallelAttention, ShardedCall

WRAPPER_KEY = "para_attn_context_parallel"


class _Patch:
    """A picklable-by-reference, not-deep-copied block/post-input patch bound to a call.
    Patches after the sharding one step aside in a call too small to split (`call.unsplit`)."""

    def __init__(self, call: ShardedCall, fn, shards: bool = False):
        self.call = call
        self.fn = fn
        self.shards = shards  # the call's first patch: it decides (ShardedCall.begin)

    def __deepcopy__(self, memo):
        return self

    def __call__(self, *args):
        if self.call.unsplit and not self.shards:
            args, extra = args
            return extra["original_block"](args)
        return self.fn(self.call, *args)


# --- FLUX: post_input shards, the last single block gathers --------------------------------

def _flux_post_input(call: ShardedCall, args: dict) -> dict:
    txt_r, img_r = call.begin(args["txt"], args["img"])  # local sequence: [txt_r, img_r]
    if call.unsplit:
        return args
    if call.control is not None:
        _local_control(call, call.control)
    out = {"img": img_r, "txt": txt_r, "img_ids": args["img_ids"], "txt_ids": args["txt_ids"]}
    if args["img_ids"] is not None:
        out["img_ids"] = call.split(args["img_ids"])[0]
        out["txt_ids"] = call.split(args["txt_ids"])[0]
    return out


def _local_control(call: ShardedCall, control: dict) -> None:
    """ControlNet residuals [B, S, C] meet the image tokens by index: FLUX adds one to
    `img[:, :S]` after each double block and to the image part of [txt, img] after each single
    block. Each becomes this rank's slice of the image tokens (the first S of the image stream:
    with FLUX Kontext the reference tokens follow them), in place in `control`, the dict
    forward_orig reads. The gathering block's stays whole (the last single block's, or the
    last double block's in a model without single blocks): its patch gathers the image
    before ComfyUI adds it."""
    lens = call.second_lens
    start = sum(lens[: call.rank])
    stop = start + lens[call.rank]

    def local(residual):
        if residual is None:
            return None
        covered = residual.shape[1]
        return residual[:, min(start, covered): min(stop, covered)]

    for name in ("input", "output"):  # residuals after double blocks, after single blocks
        control[name] = [r if (name, i) == call.whole_control else local(r)
                         for i, r in enumerate(control.get(name) or ())]


def _flux_gather(call: ShardedCall, args: dict, extra: dict) -> dict:
    img = extra["original_block"](args)["img"]
    txt_local = img[:, : call.first_lens[call.rank]]
    full_img = call.gather_stream(img, "second")
    call.end()
    # forward_orig slices off `txt.shape[1]` (this rank's text) tokens, then un-patchifies.
    return {"img": torch.cat([txt_local, full_img], dim=1)}


def _flux_gather_pair(call: ShardedCall, args: dict, extra: dict) -> dict:
    """The last block of a FLUX model without single blocks: a double block (text first)."""
    out = extra["original_block"](args)
    call.end()
    return call.gather_pair(out, text_first=True)


# --- HunyuanVideo and Wan: the first block shards, every block gets its pe slice -----------

def _local_ranges(dims, segments) -> list:
    """Token-wise modulation ranges `(start, end or None, index)` over a global sequence, for
    this rank's local one; `segments`: (global start, length, local start) of each piece."""
    local = []
    for start, end, index in dims:
        for first, length, at in segments:
            lo = max(start, first)
            hi = min(first + length if end is None else end, first + length)
            if hi > lo:
                local.append((at + lo - first, at + hi - first, index))
    return local


def _local_modulation(call: ShardedCall, args: dict) -> dict:
    """HunyuanVideo image-to-video modulates the first frame's tokens with their own vector
    (`modulation_dims*`: token ranges of the image stream, the text stream or, in single
    blocks, of the joint sequence [first, second]); the ranges move to this rank's tokens
    [first_r, second_r]."""
    rank = call.rank
    first = (sum(call.first_lens[:rank]), call.first_lens[rank])
    second = (sum(call.second_lens[:rank]), call.second_lens[rank])
    txt, img = (first, second) if call.text_first else (second, first)
    segments = {"modulation_dims_img": [(*img, 0)], "modulation_dims_txt": [(*txt, 0)],
                "modulation_dims": [(*first, 0), (sum(call.first_lens) + second[0], second[1], first[1])]}
    return {key: _local_ranges(args[key], pieces) for key, pieces in segments.items() if args.get(key) is not None}


def _frame_rows(call: ShardedCall, vec: Tensor, tokens: int) -> Optional[Tensor]:
    """Wan 2.2 gives every latent frame its own timestep (image-to-video keeps the first
    frame): `vec` [B, frames, 6, dim] modulates a frame's tokens, which its blocks find by
    dividing the token count by the frame count, wrong for a rank's slice of the tokens.
    Returns the frame of each of this rank's tokens (None when there is one timestep)."""
    frames = vec.shape[1] if vec.ndim == 4 else 1
    if frames == 1:
        return None
    if tokens % frames:
        raise RuntimeError(f"{tokens} image tokens do not split into {frames} frames")
    start = sum(call.first_lens[: call.rank])
    return torch.arange(start, start + call.first_lens[call.rank], device=vec.device) // (tokens // frames)


_LOCAL = "para_attn_local"  # marks block args already moved to this rank's tokens


def _local_args(call: ShardedCall, args: dict) -> dict:
    """The block's args for this rank's tokens. Once only: with a single block, the sharding
    patch hands its args to the gathering patch (ComfyUI's block wrappers read only their own keys)."""
    if args.get(_LOCAL):
        return args
    args = dict(args, pe=call.pe, **_local_modulation(call, args), **{_LOCAL: True})
    if call.vec_rows is not None:  # per-token modulation vectors for this rank's tokens
        args["vec"] = args["vec"].index_select(1, call.vec_rows)
    if "attention_mask" in args:
        args["attention_mask"] = None  # the global key mask lives in `call`
    return args


def _video_shard(call: ShardedCall, args: dict, extra: dict) -> dict:
    img, txt = args["img"], args.get("txt")
    if call.family == "wan":
        # Only image tokens are sharded; Wan's cross-attention keys are the (unsharded) text.
        img_r, _ = call.begin(img, img[:, :0])
        if call.unsplit:
            return extra["original_block"](args)
        call.pe = call.local_rows(args["pe"], img.shape[1], dim=1)
        call.vec_rows = _frame_rows(call, args["vec"], img.shape[1])
        return _run_block(call, _local_args(call, dict(args, img=img_r)), extra)
    mask = args.get("attention_mask")
    key_mask = None if mask is None else mask.reshape(mask.shape[0], -1)
    # The local sequence is [first_r, second_r] in the model's order; pe and mask follow it.
    first, second = (txt, img) if call.text_first else (img, txt)
    first_r, second_r = call.begin(first, second, key_mask)
    if call.unsplit:
        return extra["original_block"](args)
    call.pe = call.local_rows(args["pe"], first.shape[1], dim=2)
    img_r, txt_r = (second_r, first_r) if call.text_first else (first_r, second_r)
    return _run_block(call, _local_args(call, dict(args, img=img_r, txt=txt_r)), extra)


def _run_block(call: ShardedCall, args: dict, extra: dict) -> dict:
    """The block on this rank's tokens. A Wan block's first attention is its self-attention,
    the rest attend to the text (and CLIP) tokens: the override tells them apart by that
    order, as key lengths can be equal (a 512-token prompt, a 512-token shard)."""
    call.self_attention_next = call.family == "wan"
    return extra["original_block"](args)


def _video_block(call: ShardedCall, args: dict, extra: dict) -> dict:
    return _run_block(call, _local_args(call, args), extra)


def _video_gather_pair(call: ShardedCall, args: dict, extra: dict) -> dict:
    """The last block of a HunyuanVideo model without single blocks: a double block."""
    out = _run_block(call, _local_args(call, args), extra)
    call.end()
    return call.gather_pair(out, call.text_first)


def _video_gather(call: ShardedCall, args: dict, extra: dict) -> dict:
    out = dict(_run_block(call, _local_args(call, args), extra))
    local = out["img"]
    nf = call.first_lens[call.rank]
    if call.text_first:
        # Text first (newer ComfyUI's HunyuanVideo, as FLUX): forward_orig slices the image
        # from `txt.shape[1]`, this rank's text length, on.
        out["img"] = torch.cat([local[:, :nf], call.gather_stream(local, "second")], dim=1)
    else:
        full_img = call.gather_stream(local, "first")
        # HunyuanVideo keeps `img[:, :img_len]` (the full image length) after its single blocks.
        rest = local[:, nf:]
        out["img"] = torch.cat([full_img, rest], dim=1) if rest.shape[1] else full_img
    call.end()
    return out


def _install_block_patches(patcher, call: ShardedCall, family: str) -> None:
    counts = block_counts(patcher)
    keys = [(kind, i) for kind in ("double_block", "single_block") for i in range(counts[kind])]
    first, last = keys[0], keys[-1]
    if family == "flux":
        call.whole_control = ("output" if last[0] == "single_block" else "input", last[1])  # see _local_control
        patcher.set_model_post_input_patch(_Patch(call, _flux_post_input, shards=True))
        _chain(patcher, call, last, _Patch(call, _flux_gather if last[0] == "single_block" else _flux_gather_pair))
        return
    # Wan's blocks are all "double" and return the image alone; a HunyuanVideo double block both streams
    gather = _video_gather_pair if last[0] == "double_block" and family != "wan" else _video_gather
    for key in keys:
        if key == last:
            _chain(patcher, call, key, _Patch(call, gather))
        elif key != first:
            _chain(patcher, call, key, _Patch(call, _video_block))
    # Registered last = outermost: it sees the full sequence before anything else does (with a
    # single block, the loop above has already put the gathering patch under it).
    _chain(patcher, call, first, _Patch(call, _video_shard, shards=True))


def _chain(patcher, call: ShardedCall, key: tuple, patch: _Patch) -> None:
    chain_block_patch(patcher, *key, patch)
    call.block_patches.setdefault(key, []).append(patch)


def keep_our_block_patches(call: ShardedCall, options: dict) -> dict:
    """`options` (a model call's transformer_options) with our block patches put back around
    any patch another node put in their place for this call: Skip Layer Guidance replaces the
    blocks it skips in the options of its extra model call, and on the first or last block
    that took away the shard or the gather."""
    dit = options.get("patches_replace", {}).get("dit")
    if dit is None:
        return options
    patched = None  # a copy only for a call whose patches another node replaced
    for key, ours in call.block_patches.items():
        current = dit.get(key)
        if all(_holds(current, patch) for patch in ours):
            continue
        for patch in ours:  # innermost first: the last one installed ends outermost
            current = patch if current is None else ChainedBlockPatch(patch, current)
        patched = dict(dit) if patched is None else patched
        patched[key] = current
    if patched is None:
        return options
    return dict(options, patches_replace=dict(options["patches_replace"], dit=patched))


def _holds(registered, patch) -> bool:
    """`patch` anywhere in a chain of block patches."""
    if registered is patch:
        return True
    return isinstance(registered, ChainedBlockPatch) and (_holds(registered.outer, patch)
                                                          or _holds(registered.inner, patch))


# --- cfg parallel and checks on the whole model call --------------------------------------

class CfgSplitWrapper:
    """APPLY_MODEL wrapper: with cfg parallelism each cfg rank runs its half of a batched
    cond/uncond call; the halves are all-gathered so every rank has the full output."""

    def __init__(self, call: ShardedCall):
        self.call = call

    def __deepcopy__(self, memo):
        return self

    @property
    def keeps_model_inputs(self) -> bool:
        """Whether the model gets the call's inputs as they are (no cfg split): what Compile
        Model's precomputed modulation needs of the wrappers inside its own."""
        return self.call.cp.config.cfg == 1

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if control is not None and self.call.family != "flux":
            raise ValueError(
                "ControlNet under Context Parallel works with FLUX models only (its residuals are added by "
                "token index); remove the ControlNet or the Context Parallel node."
            )
        if kwargs.get("attention_mask") is not None and self.call.family == "flux":
            raise ValueError("Context Parallel does not support FLUX attention masks yet.")
        cp = self.call.cp
        parts = transformer_options.get("cond_or_uncond") or []
        batch = x.shape[0]
        split = not (cp.config.cfg == 1 or len(parts) != cp.config.cfg or batch % cp.config.cfg)
        per, r = (batch // cp.config.cfg, cp.cfg_rank) if split else (batch, 0)

        def half(v):
            if not split:
                return v
            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch:
                return v[r * per : (r + 1) * per]
            if isinstance(v, (list, tuple)):  # e.g. FLUX Kontext's ref_latents, ControlNet residuals
                return type(v)(half(e) for e in v)
            return v

        transformer_options = keep_our_block_patches(self.call, transformer_options)
        # A copy of ControlNet's residual lists: the post-input patch slices them in place.
        control = None if control is None else {k: half(v) if isinstance(v, (list, tuple)) else v
                                                for k, v in control.items()}
        self.call.control = control
        try:
            if not split:
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            options = dict(transformer_options, cond_or_uncond=parts[r : r + 1])
            if "uuids" in options and len(options["uuids"]) == len(parts):
                options["uuids"] = options["uuids"][r : r + 1]
            out = executor(half(x), half(t), half(c_concat), half(c_crossattn), control, options,
                           **{k: half(v) for k, v in kwargs.items()})
        finally:
            self.call.control = None
        return all_gather(out, 0, cp.cfg_group)


def install_context_parallel(model_patcher, cp: ParallelContext):
    """A clone of `model_patcher` that runs each model call context-parallel over `cp`."""
    import comfy.patcher_extension

    family = model_family(model_patcher)
    refuse_unshardable(model_patcher)
    dm = model_patcher.model.diffusion_model
    heads = getattr(getattr(dm, "params", None), "num_heads", None) or getattr(dm, "num_heads", None)
    cp.config.validate(num_heads=heads)
    patcher = model_patcher.clone()
    keep_conds_on_device(patcher)
    call = ShardedCall(cp)
    call.family = family
    call.text_first = family == "hunyuan_video" and text_first(model_patcher)  # FLUX has its own patches
    options = patcher.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = ContextParallelAttention(call, options.get("optimized_attention_override"))
    options["para_attn_cp"] = cp
    if cp.config.sequence_size > 1:
        refuse_token_patches(patcher)
        _install_block_patches(patcher, call, family)
    if cp.config.world_size > 1:
        estimate = AgreedMemoryEstimate(patcher.get_model_object("memory_required"), cp)
        patcher.add_object_patch("memory_required", estimate)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                     AgreeWhileBatching(estimate))
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, CfgSplitWrapper(call))
    return patcher
