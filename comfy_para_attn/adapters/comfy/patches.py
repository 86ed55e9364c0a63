"""Shared helpers for our `patches_replace["dit"]` block patches and model detection.

Block patches compose by chaining. `chain_block_patch` never clobbers a patch that is already
registered for a block (another pack's, or one of ours):

    order: the patch registered LAST is the OUTERMOST. It is called by ComfyUI with the
    block's arguments; its `extra["original_block"]` calls the patch that was registered
    before it (with the same `extra`, but the real `original_block`), and so on down to the
    real block.

So a feature that must see what another feature did to the arguments (First Block Cache must
see the context-parallel *shards*) has to be applied BEFORE that feature: in a graph,
First Block Cache -> ... -> Context Parallel; in a pool worker, re-apply FBCache first.

A patch is `fn(args: dict, extra: dict) -> dict`, the signature of ComfyUI's dit block
replacement (`extra["original_block"](args) -> dict`).
"""
from __future__ import annotations

from typing import Any, Callable

BlockPatch = Callable[[dict, dict], dict]

SUPPORTED_MODELS = (
    "FLUX (comfy.ldm.flux.model.Flux)",
    "HunyuanVideo (comfy.ldm.hunyuan_video.model.HunyuanVideo)",
    "Wan 2.x (comfy.ldm.wan.model.WanModel)",
)

# Wan variants whose block loop does not hand `transformer_options` to block patches.
_UNSUPPORTED_WAN = ("WanModel_S2V",)


class ChainedBlockPatch:
    """`outer` runs with `original_block` bound to `inner` (which gets the real block)."""

    def __init__(self, outer: BlockPatch, inner: BlockPatch):
        self.outer = outer
        self.inner = inner

    def __call__(self, args: dict, extra: dict) -> dict:
        inner, real = self.inner, extra["original_block"]

        def call_inner(inner_args: dict) -> dict:
            return inner(inner_args, {**extra, "original_block": real})

        return self.outer(args, {**extra, "original_block": call_inner})

    def __repr__(self):
        return f"ChainedBlockPatch(outer={self.outer!r}, inner={self.inner!r})"


def get_block_patch(model_patcher, block_type: str, index: int):
    """The patch currently registered for `(block_type, index)`, or None."""
    to = model_patcher.model_options.get("transformer_options", {})
    return to.get("patches_replace", {}).get("dit", {}).get((block_type, index))


def chain_block_patch(model_patcher, block_type: str, index: int, patch_fn: BlockPatch) -> None:
    """Register `patch_fn` for `patches_replace["dit"][(block_type, index)]` on `model_patcher`
    (in place: clone first), wrapping any patch already there (see the module docstring)."""
    existing = get_block_patch(model_patcher, block_type, index)
    patch = patch_fn if existing is None else ChainedBlockPatch(patch_fn, existing)
    model_patcher.set_model_patch_replace(patch, "dit", block_type, index)


def diffusion_model(model) -> Any:
    """The `nn.Module` inside a ModelPatcher / BaseModel, or `model` itself."""
    inner = getattr(model, "model", model)  # ModelPatcher -> BaseModel
    return getattr(inner, "diffusion_model", inner)


def compute_dtype(base_model):
    """The dtype ComfyUI's model computes in: its manual-cast dtype when it stores the weights
    in another one (fp8 checkpoints, fp8 weight dtypes), else the weights' own."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


def model_family(model) -> str:
    """"flux", "hunyuan_video" or "wan" for a ModelPatcher (or its diffusion model);
    ValueError naming the supported models otherwise."""
    dm = diffusion_model(model)
    name = type(dm).__name__
    from comfy.ldm.flux.model import Flux
    from comfy.ldm.hunyuan_video.model import HunyuanVideo
    from comfy.ldm.wan.model import WanModel

    if isinstance(dm, HunyuanVideo):
        return "hunyuan_video"
    if isinstance(dm, Flux):
        return "flux"
    if isinstance(dm, WanModel) and name not in _UNSUPPORTED_WAN:
        return "wan"
    raise ValueError(
        f"comfy-para-attn does not support this model ({type(dm).__module__}.{name}). "
        f"Supported: {', '.join(SUPPORTED_MODELS)}. Bypass the node for this model (Ctrl+B)."
    )


def text_first(model) -> bool:
    """Whether the joint sequence of the model's double and single blocks is [text, image]
    (FLUX; HunyuanVideo in newer ComfyUI) rather than [image, text] (HunyuanVideo in ComfyUI
    0.3.x, whose double blocks are built with `flipped_img_txt`). The rope `pe` and the key
    mask follow the same order. Wan has no text in its self-attention (False)."""
    family = model_family(model)
    if family == "wan":
        return False
    blocks = getattr(diffusion_model(model), "double_blocks", None) or ()
    return family == "flux" or not any(getattr(block, "flipped_img_txt", False) for block in blocks[:1])


def block_counts(model) -> dict[str, int]:
    """Number of blocks per `patches_replace["dit"]` block type, e.g. {"double_block": 19,
    "single_block": 38} for FLUX.1; Wan has double_block only."""
    family = model_family(model)
    dm = diffusion_model(model)
    if family == "wan":
        return {"double_block": len(dm.blocks), "single_block": 0}
    return {"double_block": len(dm.double_blocks), "single_block": len(dm.single_blocks)}


def block_keys(model) -> list[tuple[str, int]]:
    """Every patchable block in execution order: double blocks, then single blocks."""
    counts = block_counts(model)
    return [(kind, i) for kind in ("double_block", "single_block") for i in range(counts[kind])]
