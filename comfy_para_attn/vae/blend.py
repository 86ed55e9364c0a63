"""Blending decoded tiles into the output with exactly ComfyUI's weights and float order.

Tiles must be added in plan order (`Tile.index`); the arithmetic is the same as
`comfy.utils.tiled_scale_multidim` (feather mask built by the same multiplications, the
same accumulation order, `out / out_div`, grids summed in order and divided by their
count), so a decode blended here equals ComfyUI's bit for bit when the tiles do.
"""
from __future__ import annotations

import functools

import torch

from .tiling import Tile, TilePlan


def feather_mask(shape: tuple[int, ...], feather: tuple[int, ...]) -> torch.Tensor:
    """The weights of one decoded tile [*spatial] as a [1, 1, *spatial] float32 tensor.

    Same loop as ComfyUI (each end of each dimension ramps (t + 1) / feather, a dimension
    whose feather is not shorter than the tile is left at 1); broadcasting over batch and
    channels gives the values ComfyUI computes on a mask of the tile's full shape."""
    mask = torch.ones((1, 1) + tuple(shape), dtype=torch.float32)
    for d, ramp in enumerate(feather, start=2):
        if ramp >= mask.shape[d]:
            continue
        for t in range(ramp):
            a = (t + 1) / ramp
            mask.narrow(d, t, 1).mul_(a)
            mask.narrow(d, mask.shape[d] - 1 - t, 1).mul_(a)
    return mask


@functools.lru_cache(maxsize=64)
def shared_feather_mask(shape: tuple[int, ...], feather: tuple[int, ...]) -> torch.Tensor:
    """`feather_mask`, built once per (shape, feather) and shared: callers must not modify it."""
    return feather_mask(shape, feather)


def tile_region(full: torch.Tensor, tile: Tile, size: tuple[int, ...] | None = None) -> torch.Tensor:
    """The view of `full` [N, C, *out_spatial] that `tile` covers (`size`: its decoded
    spatial size, default the plan's `tile.out_size`)."""
    for d, (start, n) in enumerate(zip(tile.out_start, size or tile.out_size), start=2):
        full = full.narrow(d, start, n)
    return full


class Blender:
    """Accumulates decoded tiles (added in plan order) into `output` [B, C, *out_spatial]."""

    def __init__(self, plan: TilePlan, output: torch.Tensor | None = None):
        self.plan = plan
        if output is None:
            output = torch.empty(plan.out_shape, dtype=torch.float32)
        if tuple(output.shape) != plan.out_shape or output.dtype != torch.float32:
            raise ValueError(f"output must be float32 {plan.out_shape}, got {output.dtype} {tuple(output.shape)}")
        self.output = output
        self._next = 0
        self._acc: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._remaining: dict[tuple[int, int], int] = {}
        for tile in plan.tiles:
            key = (tile.grid, tile.batch)
            self._remaining[key] = self._remaining.get(key, 0) + 1

    def add(self, tile: Tile, decoded: torch.Tensor) -> None:
        if tile.index != self._next:
            raise RuntimeError(f"tile {tile.index} added out of order (expected {self._next})")
        self._next += 1
        decoded = decoded.to(device="cpu", dtype=torch.float32)
        expected = (1, self.plan.out_channels)
        if tuple(decoded.shape[:2]) != expected or decoded.ndim != len(self.plan.out_shape):
            raise ValueError(f"decoded tile has shape {tuple(decoded.shape)}; expected {expected} + "
                             f"{len(self.plan.out_spatial)} spatial dims")
        key = (tile.grid, tile.batch)
        if tile.whole:
            self._finish_item(tile.grid, tile.batch, decoded)
            return
        if key not in self._acc:
            shape = (1, self.plan.out_channels) + self.plan.out_spatial
            self._acc[key] = (torch.zeros(shape, dtype=torch.float32),
                              torch.zeros((1, 1) + self.plan.out_spatial, dtype=torch.float32))
        size = tuple(decoded.shape[2:])
        mask = shared_feather_mask(size, self.plan.feather[tile.grid])
        out, out_div = (tile_region(t, tile, size) for t in self._acc[key])
        out.add_(decoded * mask)
        out_div.add_(mask)
        self._remaining[key] -= 1
        if self._remaining[key] == 0:
            total, weights = self._acc.pop(key)
            self._finish_item(tile.grid, tile.batch, total / weights)

    def _finish_item(self, grid: int, batch: int, item: torch.Tensor) -> None:
        target = self.output[batch:batch + 1]
        if grid == 0:
            target.copy_(item)
        else:
            target.copy_(target + item)  # ComfyUI sums whole grid outputs: ((g0 + g1) + g2)

    def result(self) -> torch.Tensor:
        if self._next != len(self.plan.tiles):
            raise RuntimeError(f"only {self._next} of {len(self.plan.tiles)} tiles were blended")
        if len(self.plan.grids) > 1:
            self.output.copy_(self.output / float(len(self.plan.grids)))
        return self.output


@functools.lru_cache(maxsize=1)  # one image-sized map per grid: keep only the latest plan's
def blend_weights(plan: TilePlan) -> dict[int, torch.Tensor]:
    """Per grid (of those not decoded whole), the summed feather weights of its tiles over
    one item, [1, 1, *out_spatial] float32: what ComfyUI divides that grid's sum by."""
    weights: dict[int, torch.Tensor] = {}
    for tile in plan.tiles:
        if tile.whole or tile.batch != 0:
            continue
        if tile.grid not in weights:
            weights[tile.grid] = torch.zeros((1, 1) + plan.out_spatial, dtype=torch.float32)
        tile_region(weights[tile.grid], tile).add_(shared_feather_mask(tile.out_size, plan.feather[tile.grid]))
    return weights


def release_caches() -> None:
    """Drop the cached feather masks and weight maps. They are shared by the tiles of one
    decode; kept after it, they would hold image-sized tensors (a 720p x 81-frame Wan decode:
    ~0.5 GiB) in every process that decoded, for its life."""
    shared_feather_mask.cache_clear()
    blend_weights.cache_clear()


def blend_tiles(plan: TilePlan, decoded: list[torch.Tensor]) -> torch.Tensor:
    """Blend all decoded tiles (in plan order) at once."""
    blender = Blender(plan)
    for tile, tensor in zip(plan.tiles, decoded, strict=True):
        blender.add(tile, tensor)
    return blender.result()
