"""Helpers for the comfyui-tier pool tests: tiny models sampled in-process and through the
Context Parallel pool with the same inputs."""
from __future__ import annotations

import torch


def sampling_inputs(family: str, *, seed: int = 0, tokens: int = 8, latent: dict | None = None):
    from comfy_para_attn.testing import comfy_models

    patcher = comfy_models.build(family, seed=seed)
    positive = comfy_models.conditioning(patcher, tokens=tokens, seed=1)
    negative = comfy_models.conditioning(patcher, tokens=tokens, seed=2)
    shape = comfy_models.latent_shape(family, **(latent or {}))
    image = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.5
    return patcher, positive, negative, image


class FaultyBlock:
    """A picklable dit block patch (another pack's, as far as the pool knows) that fails
    inside the workers: `raise` raises on rank `rank`, `hang` sleeps past any timeout."""

    def __init__(self, how: str, rank: int = 1):
        self.how = how
        self.rank = rank

    def __call__(self, args, extra):
        import time

        import torch.distributed as dist

        here = dist.get_rank() if dist.is_initialized() else 0
        if here == self.rank:
            if self.how == "raise":
                raise RuntimeError("injected failure in a block patch")
            if self.how == "hang":
                time.sleep(3600)
        return extra["original_block"](args)


def with_faulty_block(patcher, how: str, rank: int = 1):
    model = patcher.clone()
    model.set_model_patch_replace(FaultyBlock(how, rank), "dit", "double_block", 0)
    return model
