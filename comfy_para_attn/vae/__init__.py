"""Parallel tiled VAE decode, model-agnostic: which tiles (`plan_tiles`, `comfy_grids`),
which rank decodes each (`assign_tiles`), how they blend (`Blender`, ComfyUI's weights),
and the rank loops (`decode_tiles`, `decode_tiles_partial`). Adapters supply the VAE's
decode function and scales."""
from .blend import Blender, blend_tiles, blend_weights, feather_mask
from .parallel import cpu_group, decode_tiles, decode_tiles_partial, sum_partials
from .tiling import (Tile, TiledDecodeSettings, TileGrid, TilePlan, assign_tiles, comfy_grids, latent_tile_sizes,
                     plan_tiles)

__all__ = ["Blender", "Tile", "TileGrid", "TilePlan", "assign_tiles", "blend_tiles", "blend_weights", "comfy_grids",
           "cpu_group", "decode_tiles", "decode_tiles_partial", "feather_mask", "latent_tile_sizes", "plan_tiles",
           "sum_partials", "TiledDecodeSettings"]
