"""Parallel tiled decode for diffusers' AutoencoderKL (FLUX, SD) and AutoencoderKLHunyuanVideo.

    out = parallel_tiled_decode(vae, latents, tile_size=512, overlap=64)   # on every rank

Run it on every rank of a torch.distributed program (torchrun), with the same latent: each
rank decodes its share of the tiles with the VAE's own (untiled) decode and rank `dst`
blends them; without an initialized process group (or with one rank) it is a plain tiled
decode with the same tiles and blending. Tiles and weights are ComfyUI's
(`comfy.utils.tiled_scale_multidim`), not those of diffusers' `enable_tiling()`: tile
sizes are in pixels and frames like ComfyUI's VAEDecodeTiled node, and `grids="comfy"`
also averages ComfyUI's three 2D grids (the default, "single", decodes each pixel once
per overlap, which is a third of the work). Returns the decoder output (the `.sample` of
`vae.decode`) in float32 on the latent's device, on `dst` (every rank with `all_ranks`).
"""
from __future__ import annotations

import contextlib

import torch

from ...vae import TiledDecodeSettings, TileGrid, TilePlan, comfy_grids, cpu_group, decode_tiles, latent_tile_sizes
from ...vae import plan_tiles


def _axes(vae, dims: int):
    """(scale, position, spatial compression, temporal compression) of this VAE's decoder."""
    name = type(vae).__name__
    if name == "AutoencoderKLHunyuanVideo":
        if dims != 3:
            raise ValueError(f"{name} decodes video latents [B, C, T, H, W]; got {dims} spatial dims")
        spatial, temporal = vae.spatial_compression_ratio, vae.temporal_compression_ratio
        # Causal in time: n latent frames decode to (n - 1) * r + 1 frames; frame p starts at r * p.
        factors = (temporal, spatial, spatial)
        scale = lambda d, n: max(0, (n - 1) * temporal + 1) if d == 0 else n * spatial  # noqa: E731
        return scale, (lambda d, p: p * factors[d]), spatial, temporal
    if name == "AutoencoderKL":
        if dims != 2:
            raise ValueError(f"{name} decodes image latents [B, C, H, W]; got {dims} spatial dims")
        spatial = 2 ** (len(vae.config.block_out_channels) - 1)
        return (lambda d, n: n * spatial), (lambda d, p: p * spatial), spatial, None
    raise ValueError(f"parallel tiled decode supports AutoencoderKL and AutoencoderKLHunyuanVideo, not {name}")


def plan_decode(vae, latents: torch.Tensor, settings: TiledDecodeSettings, grids: str = "single") -> TilePlan:
    """Check the latent against the VAE and plan its tiles (ValueError says what is wrong)."""
    dims = latents.ndim - 2
    scale, position, spatial, temporal = _axes(vae, dims)
    channels = vae.config.latent_channels
    if latents.shape[1] != channels:
        raise ValueError(f"the latent has {latents.shape[1]} channels but this VAE takes {channels}")
    tile, overlap = latent_tile_sizes(settings, dims, spatial, temporal)
    if grids == "comfy":
        tile_grids = comfy_grids(dims, tile, overlap)
    elif grids == "single":
        tile_grids = (TileGrid(tile, overlap),)
    else:
        raise ValueError(f"grids must be 'single' or 'comfy', got {grids!r}")
    return plan_tiles(latents.shape, tile_grids, scale=scale, position=position,
                      out_channels=vae.config.out_channels)


@contextlib.contextmanager
def _untiled(vae):
    """The VAE's own whole decode for each tile: its tiling and framewise decoding off."""
    flags = {name: getattr(vae, name) for name in ("use_tiling", "use_framewise_decoding", "use_slicing")
             if hasattr(vae, name)}
    try:
        for name in flags:
            setattr(vae, name, False)
        yield
    finally:
        for name, value in flags.items():
            setattr(vae, name, value)


def parallel_tiled_decode(vae, latents: torch.Tensor, *, tile_size: int = 512, overlap: int = 64,
                          temporal_size: int = 64, temporal_overlap: int = 8, grids: str = "single",
                          group=None, dst: int = 0, all_ranks: bool = False) -> torch.Tensor | None:
    """See the module docstring. `group`: the ranks to share the tiles (default: all)."""
    import torch.distributed as dist

    settings = TiledDecodeSettings(tile_size, overlap, temporal_size, temporal_overlap)
    plan = plan_decode(vae, latents, settings, grids)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if distributed else (0, 1)
    gloo = cpu_group(group) if distributed else None
    device, dtype = vae.device, vae.dtype

    def decode(z):
        return vae.decode(z.to(device=device, dtype=dtype), return_dict=False)[0]

    with torch.no_grad(), _untiled(vae):
        out = decode_tiles(latents.detach().cpu(), plan, decode, rank=rank, world_size=world, group=gloo, dst=dst,
                           device=device)
    if all_ranks and distributed:
        if out is None:
            out = torch.empty(plan.out_shape, dtype=torch.float32)
        source = dst if gloo is None else dist.get_global_rank(gloo, dst)
        dist.broadcast(out, source, group=gloo)
    return None if out is None else out.to(latents.device)
