"""Parallel tiled VAE decode, model-agnostic: which tiles (`plan_tiles`, `comfy_grids`),
which rank decodes each (`assign_tiles`), how they blend (`Blender`, ComfyUI's weights),
and the rank loop (`decode_tiles`). Adapters supply the VAE's decode function and scales."""
from .blend import Blender, blend_tiles, feather_mask
from .parallel import cpu_group, decode_tiles, decode_tiles_reduced
from .tiling import (Tile, TiledDecodeSettings, TileGrid, TilePlan, assign_tiles, comfy_grids, latent_tile_sizes,
                     plan_tiles)

__all__ = ["Blender", "Tile", "TileGrid", "TilePlan", "assign_tiles", "blend_tiles", "comfy_grids",
           "cpu_group", "decode_tiles", "decode_tiles_reduced", "feather_mask", "latent_tile_sizes", "plan_tiles",
           "TiledDecodeSettings"]
