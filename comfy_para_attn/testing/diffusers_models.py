"""Tiny random-weight diffusers transformers (Flux, HunyuanVideo) with matching inputs.

`inputs(...)` returns the keyword arguments of one transformer call; `timestep` is given
per call so a test can walk a schedule. Nothing is downloaded.
"""
from __future__ import annotations

import torch


def tiny_flux(*, num_layers: int = 2, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
              seed: int = 0, dtype=torch.float32):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def flux_inputs(*, batch: int = 1, height: int = 4, width: int = 4, tokens: int = 6, seed: int = 0,
                dtype=torch.float32, in_channels: int = 16, text_dim: int = 32, pooled_dim: int = 32,
                device=None) -> dict:
    """Inputs of one Flux call; the channel sizes default to `tiny_flux`'s."""
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    inputs = {
        "hidden_states": torch.randn(batch, height * width, in_channels, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, tokens, text_dim, generator=g, dtype=dtype),
        "pooled_projections": torch.randn(batch, pooled_dim, generator=g, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(tokens, 3, dtype=dtype),
        "guidance": torch.full((batch,), 3.5, dtype=dtype),
    }
    return inputs if device is None else {k: v.to(device) for k, v in inputs.items()}


# FLUX.1-dev's transformer config (12B parameters), for benchmarks with random weights.
FLUX_DEV_CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def flux_dev_sized(*, device="cuda", dtype=torch.bfloat16, seed: int = 0, **overrides):
    """A random-weight FLUX.1-dev-sized transformer, initialized directly on `device` in
    `dtype` (seconds on a GPU instead of minutes of CPU init plus a copy)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**{**FLUX_DEV_CONFIG, **overrides})
    finally:
        torch.set_default_dtype(default_dtype)
    return model.eval()


def tiny_hunyuan_video(*, num_layers: int = 2, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
                       seed: int = 0, dtype=torch.float32):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim,
        num_layers=num_layers, num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=1,
        patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
    )
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def hunyuan_video_inputs(*, batch: int = 1, frames: int = 2, height: int = 4, width: int = 4, tokens: int = 6,
                         seed: int = 0, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[:, -2:] = False  # padded text tokens, as a tokenizer produces
    return {
        "hidden_states": torch.randn(batch, 4, frames, height, width, generator=g, dtype=dtype),
        "encoder_hidden_states": torch.randn(batch, tokens, 32, generator=g, dtype=dtype),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(batch, 32, generator=g, dtype=dtype),
        "guidance": torch.full((batch,), 6000.0, dtype=dtype),
    }


def denoise(transformer, inputs: dict, timesteps, *, scale: float = 1.0) -> torch.Tensor:
    """A plain Euler-like loop: the model's output drives the next latent (so steps differ).
    `timesteps` in the model's units (Flux: sigma in [0, 1]; HunyuanVideo: [0, 1000])."""
    x = inputs["hidden_states"]
    ts = list(timesteps)
    with torch.no_grad():
        for i, t in enumerate(ts):
            kw = dict(inputs, hidden_states=x, timestep=torch.full((x.shape[0],), float(t), dtype=x.dtype),
                      return_dict=False)
            v = transformer(**kw)[0]
            nxt = ts[i + 1] if i + 1 < len(ts) else 0.0
            x = x + (nxt - float(t)) / scale * v
    return x
