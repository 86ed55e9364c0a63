"""Which tiles a tiled VAE decode runs, where each lands in the output, and which rank
decodes it. Plain data (ints and tuples): a plan is made once, by whoever knows the VAE's
scale factors, and travels to the ranks in a job payload.

The decomposition is ComfyUI's `comfy.utils.tiled_scale_multidim`: per batch item, tiles
start every `tile - overlap` latent positions along each tiled dimension (the last tile is
shorter when the size does not divide evenly), each decoded tile is weighted by a linear
feather of `scale(overlap)` output elements at both ends of each dimension, and the output
is the weighted sum divided by the summed weights. An item that fits in one tile is
decoded whole, without weights. A plan may hold several grids (ComfyUI's 2D tiled decode
averages three: tall, wide and square tiles); the result is their mean, in grid order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

# scale(dim, n) -> output length of n latent elements along spatial dim `dim`;
# position(dim, p) -> output index where latent index p lands along `dim`.
ScaleFn = Callable[[int, int], int]


@dataclass(frozen=True)
class TileGrid:
    """Tile and overlap sizes in latent elements, one per spatial dimension."""

    tile: tuple[int, ...]
    overlap: tuple[int, ...]


@dataclass(frozen=True)
class Tile:
    index: int                    # position in the blend order
    grid: int
    batch: int
    start: tuple[int, ...]        # latent start per spatial dimension
    size: tuple[int, ...]         # latent length per spatial dimension
    out_start: tuple[int, ...]    # output start per spatial dimension
    whole: bool                   # the item fits one tile: copied as decoded, no weights
    out_size: tuple[int, ...] = ()  # decoded length per spatial dimension (scale of `size`)


@dataclass(frozen=True)
class TilePlan:
    latent_shape: tuple[int, ...]     # [B, C, *spatial]
    out_spatial: tuple[int, ...]      # output spatial size of one item
    out_channels: int
    grids: tuple[TileGrid, ...]
    feather: tuple[tuple[int, ...], ...]  # per grid, per dimension, in output elements
    tiles: tuple[Tile, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.latent_shape[0], self.out_channels) + self.out_spatial

    def latent_slices(self, tile: Tile) -> tuple[slice, ...]:
        """Index of a tile's latent in the full latent [B, C, *spatial]."""
        return (slice(tile.batch, tile.batch + 1), slice(None)) + tuple(
            slice(s, s + n) for s, n in zip(tile.start, tile.size))


def _positions(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    # ComfyUI: range(0, L - overlap, tile - overlap), each start clamped to L - overlap.
    return [max(0, min(length - overlap, p)) for p in range(0, length - overlap, tile - overlap)]


def validate_grid(grid: TileGrid, dims: int) -> None:
    if len(grid.tile) != dims or len(grid.overlap) != dims:
        raise ValueError(f"tile {grid.tile} / overlap {grid.overlap} need {dims} entries (one per "
                         f"latent dimension)")
    for d, (tile, overlap) in enumerate(zip(grid.tile, grid.overlap)):
        if overlap < 0:
            raise ValueError(f"overlap must be >= 0, got {overlap} (latent dimension {d})")
        if tile <= overlap:
            raise ValueError(f"tile size {tile} must be larger than the overlap {overlap} (latent "
                             f"elements, dimension {d}); use a larger tile or a smaller overlap")


def plan_tiles(latent_shape: Sequence[int], grids: Sequence[TileGrid], *, scale: ScaleFn,
               position: ScaleFn | None = None, out_channels: int = 3) -> TilePlan:
    """All tiles of decoding a latent [B, C, *spatial] with `grids`, in ComfyUI's order (grid,
    then batch item, then tile positions with the last dimension fastest)."""
    latent_shape = tuple(int(s) for s in latent_shape)
    dims = len(latent_shape) - 2
    position = position or scale
    if dims < 1 or not grids:
        raise ValueError(f"need a latent [B, C, *spatial] and at least one grid, got {latent_shape}")
    if min(latent_shape) < 1:
        raise ValueError(f"empty latent {latent_shape}")
    for grid in grids:
        validate_grid(grid, dims)
    spatial = latent_shape[2:]
    out_spatial = tuple(int(round(scale(d, n))) for d, n in enumerate(spatial))
    tiles, feathers = [], []
    for g, grid in enumerate(grids):
        feathers.append(tuple(int(round(scale(d, o))) for d, o in enumerate(grid.overlap)))
        whole = all(n <= t for n, t in zip(spatial, grid.tile))
        starts = [_positions(n, t, o) for n, t, o in zip(spatial, grid.tile, grid.overlap)]
        for b in range(latent_shape[0]):
            for start in itertools.product(*starts):
                size = tuple(min(t, n - s) for s, t, n in zip(start, grid.tile, spatial))
                out_start = tuple(int(round(position(d, s))) for d, s in enumerate(start))
                out_size = tuple(int(round(scale(d, n))) for d, n in enumerate(size))
                tiles.append(Tile(len(tiles), g, b, tuple(start), size, out_start, whole, out_size))
    return TilePlan(latent_shape, out_spatial, int(out_channels), tuple(grids), tuple(feathers),
                    tuple(tiles))


def tile_cost(tile: Tile) -> int:
    """Relative decode cost of a tile: its latent volume."""
    cost = 1
    for n in tile.size:
        cost *= n
    return cost


def assign_tiles(plan: TilePlan, world_size: int) -> tuple[int, ...]:
    """The rank that decodes each tile: in blend order, each tile goes to the rank with the
    least work so far (ties to the lowest rank), so ranks finish together and rank 0 can
    blend tiles as they arrive. Deterministic: every rank computes the same answer."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owners = []
    for tile in plan.tiles:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        load[rank] += tile_cost(tile)
        owners.append(rank)
    return tuple(owners)


def comfy_grids(dims: int, tile: Sequence[int], overlap: Sequence[int]) -> tuple[TileGrid, ...]:
    """The grids of ComfyUI's `VAE.decode_tiled` for a latent with `dims` spatial dimensions:
    2D (`decode_tiled_`): tiles (2h, w/2), (h/2, 2w) and (h, w), averaged; 3D
    (`decode_tiled_3d`) and 1D: one grid. `tile`/`overlap` in latent elements, per dim."""
    tile, overlap = tuple(int(t) for t in tile), tuple(int(o) for o in overlap)
    if dims == 2:
        h, w = tile
        # tiled_scale(samples, fn, tile_x, tile_y) tiles (tile_y, tile_x) = (H, W); ComfyUI
        # passes (tile_x // 2, tile_y * 2), then (tile_x * 2, tile_y // 2), then (tile_x, tile_y)
        # with tile_x = w and tile_y = h.
        return (TileGrid((h * 2, w // 2), overlap), TileGrid((h // 2, w * 2), overlap),
                TileGrid((h, w), overlap))
    return (TileGrid(tile, overlap),)


@dataclass(frozen=True)
class TiledDecodeSettings:
    """ComfyUI VAEDecodeTiled's inputs, in its units: pixels and frames."""

    tile_size: int = 512
    overlap: int = 64
    temporal_size: int = 64
    temporal_overlap: int = 8


def oversized_overlaps(settings: TiledDecodeSettings, video: bool) -> dict[str, str]:
    """{input name: why} for the overlaps not smaller than their tile, which VAEDecodeTiled
    reduces silently (overlap to tile_size / 4, temporal_overlap halved)."""
    s, found = settings, {}
    if s.overlap >= s.tile_size:
        found["overlap"] = f"overlap ({s.overlap} px) must be smaller than tile_size ({s.tile_size} px)"
    if video and s.temporal_overlap >= s.temporal_size:
        found["temporal_overlap"] = (f"temporal_overlap ({s.temporal_overlap} frames) must be smaller than "
                                     f"temporal_size ({s.temporal_size} frames)")
    return found


def comfy_overlaps(settings: TiledDecodeSettings) -> tuple[int, int]:
    """(overlap px, temporal_overlap frames) as VAEDecodeTiled uses them: overlap at most
    tile_size / 4, temporal_overlap halved when above temporal_size / 2."""
    s = settings
    overlap = s.overlap if s.tile_size >= s.overlap * 4 else s.tile_size // 4
    t_overlap = s.temporal_overlap if s.temporal_size >= s.temporal_overlap * 2 else s.temporal_overlap // 2
    return overlap, t_overlap


def latent_tile_sizes(settings: TiledDecodeSettings, dims: int, spatial_compression: int,
                      temporal_compression: int | None = None,
                      strict: bool = True) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(tile, overlap) in latent elements per spatial dimension, converted the way ComfyUI's
    VAEDecodeTiled node and VAE.decode_tiled convert them (their silent clamps included).
    With `strict` (the library API), an overlap those clamps would reduce is a ValueError that
    says the largest one used; without it, the clamps reduce it as VAEDecodeTiled does (the
    ComfyUI node's drop-in behaviour, which logs it)."""
    s = settings
    oversized = oversized_overlaps(s, video=dims == 3) if strict else {}
    if "overlap" in oversized:
        raise ValueError(oversized["overlap"])
    overlap, t_overlap = comfy_overlaps(s)
    if strict and overlap != s.overlap:
        raise ValueError(f"overlap ({s.overlap} px) is more than tile_size / 4: ComfyUI's tiling would use "
                         f"{overlap} px; pass at most {s.tile_size // 4}")
    tile, overlap = s.tile_size // spatial_compression, overlap // spatial_compression
    if tile < 1:
        raise ValueError(f"tile_size {s.tile_size} px is smaller than one latent element "
                         f"({spatial_compression} px) of this VAE")
    if dims == 2:
        return (tile, tile), (overlap, overlap)
    if dims != 3:
        raise ValueError(f"tiled decode supports image and video latents, not {dims} spatial dims")
    if temporal_compression is None:
        raise ValueError("this VAE decodes images, but the latent is a video [B, C, T, H, W]")
    if "temporal_overlap" in oversized:
        raise ValueError(oversized["temporal_overlap"])
    if strict and t_overlap != s.temporal_overlap:
        raise ValueError(f"temporal_overlap ({s.temporal_overlap} frames) is more than temporal_size / 2: "
                         f"ComfyUI's tiling would use {t_overlap}; pass at most {s.temporal_size // 2}")
    t_size = max(2, s.temporal_size // temporal_compression)
    t_overlap = max(1, min(t_size // 2, t_overlap // temporal_compression))
    return (max(2, t_size), tile, tile), (max(1, t_overlap), overlap, overlap)
