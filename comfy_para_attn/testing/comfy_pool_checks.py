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
