"""Decode a tile plan on every rank of a torch.distributed group; rank `dst` blends.

Call `decode_tiles` on every rank with the same plan and latent. Work goes in rounds: in
round r each rank decodes its r-th tile (`assign_tiles`), then `on_round` runs on every
rank (a place for collective interrupt checks and progress), then ranks other than `dst`
send their tile to `dst` (non-blocking, CPU tensors over gloo) and `dst` receives and
blends, in plan order, every tile decoded so far, while the others decode the next round.
With world size 1 it is a plain tiled decode, with the same blending.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..attention.collectives import cpu_group  # noqa: F401  (re-exported by comfy_para_attn.vae)
from .blend import Blender, feather_mask
from .tiling import TilePlan, assign_tiles

DecodeFn = Callable[[torch.Tensor], torch.Tensor]
# on_round(round, rounds, tiles decoded on all ranks so far, tiles in the plan)
RoundFn = Callable[[int, int, int, int], None]


def rounds_done(owners: tuple[int, ...], world_size: int, rounds_finished: int) -> int:
    """Tiles decoded on all ranks once `rounds_finished` rounds are over."""
    counts = [owners.count(r) for r in range(world_size)]
    return sum(min(rounds_finished, c) for c in counts)


def decode_tiles(samples: torch.Tensor, plan: TilePlan, decode: DecodeFn, *, rank: int = 0,
                 world_size: int = 1, group=None, dst: int = 0, output: torch.Tensor | None = None,
                 on_round: RoundFn | None = None) -> torch.Tensor | None:
    """The blended decode [B, C, *out_spatial] (float32, CPU) on rank `dst`, None elsewhere.

    `decode(latent_tile)` returns the decoded tile [1, C, *spatial] (any device/dtype; it is
    moved to CPU float32). `group`: a gloo group of `world_size` ranks (None: the default
    group); `rank` and `dst` are ranks within it. `output`: an optional float32 tensor to blend into.
    """
    if tuple(samples.shape) != plan.latent_shape:
        raise ValueError(f"latent has shape {tuple(samples.shape)}, the plan was made for {plan.latent_shape}")
    owners = assign_tiles(plan, world_size)
    mine = [tile for tile, owner in zip(plan.tiles, owners) if owner == rank]
    ordinal = {}  # tile index -> round in which its owner decodes it
    seen = [0] * world_size
    for tile, owner in zip(plan.tiles, owners):
        ordinal[tile.index] = seen[owner]
        seen[owner] += 1
    rounds = max(seen)
    blender = Blender(plan, output) if rank == dst else None
    held: dict[int, torch.Tensor] = {}
    sends = []
    cursor = 0
    for r in range(rounds):
        decoded = None
        if r < len(mine):
            decoded = decode(samples[plan.latent_slices(mine[r])]).to(device="cpu", dtype=torch.float32)
        # Before any send of this round: a rank that stops here (interrupt) leaves no send
        # unmatched, since dst received every earlier round's tiles in that round.
        if on_round is not None:
            on_round(r, rounds, rounds_done(owners, world_size, r + 1), len(plan.tiles))
        if decoded is not None:
            if rank == dst:
                held[mine[r].index] = decoded
            else:
                sends += _send(decoded.contiguous(), dst, group)
        if blender is None:
            continue
        while cursor < len(plan.tiles) and ordinal[cursor] <= r:
            tile = plan.tiles[cursor]
            owner = owners[cursor]
            decoded = held.pop(cursor) if owner == dst else _recv(owner, len(plan.latent_shape), group)
            blender.add(tile, decoded)
            cursor += 1
    for work, _buffer in sends:
        work.wait()
    return blender.result() if blender is not None else None


def _global(rank: int, group) -> int:
    if group is None:
        return rank
    import torch.distributed as dist

    return dist.get_global_rank(group, rank)


def _send(tensor: torch.Tensor, dst: int, group) -> list:
    import torch.distributed as dist

    header = torch.tensor(tensor.shape, dtype=torch.int64)
    peer = _global(dst, group)
    # The buffers must live until their sends complete: keep them next to the works.
    return [(dist.isend(header, peer, group=group), header), (dist.isend(tensor, peer, group=group), tensor)]


def _recv(src: int, ndim: int, group) -> torch.Tensor:
    import torch.distributed as dist

    peer = _global(src, group)
    header = torch.empty(ndim, dtype=torch.int64)
    dist.recv(header, peer, group=group)
    tensor = torch.empty(tuple(header.tolist()), dtype=torch.float32)
    dist.recv(tensor, peer, group=group)
    return tensor


def decode_tiles_reduced(samples: torch.Tensor, plan: TilePlan, decode: DecodeFn, *, rank: int, world_size: int,
                         device, group=None, dst: int = 0, output: torch.Tensor | None = None,
                         on_round: RoundFn | None = None) -> torch.Tensor | None:
    """Like `decode_tiles`, but every rank blends its own tiles into full-size partial sums
    (weighted tiles and weights, per grid and batch item) on `device`, and one sum-reduce
    brings them to `dst`. Blending runs on all ranks at once and nothing travels per tile,
    so it scales; the result equals `decode_tiles` up to float summation order (~1e-6).
    `group` is a group of `world_size` ranks for `device` (NCCL on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    if tuple(samples.shape) != plan.latent_shape:
        raise ValueError(f"latent has shape {tuple(samples.shape)}, the plan was made for {plan.latent_shape}")
    owners = assign_tiles(plan, world_size)
    mine = [tile for tile, owner in zip(plan.tiles, owners) if owner == rank]
    rounds = max(owners.count(r) for r in range(world_size))
    keys = sorted({(tile.grid, tile.batch) for tile in plan.tiles})
    channels, spatial = plan.out_channels, plan.out_spatial
    pixels = 1
    for n in spatial:
        pixels *= n
    per_key = (channels + 1) * pixels
    sums = torch.zeros(len(keys) * per_key, dtype=torch.float32, device=device)  # one buffer: one reduce
    views = {}
    for i, key in enumerate(keys):
        base = i * per_key
        views[key] = (sums[base: base + channels * pixels].view((1, channels) + spatial),
                      sums[base + channels * pixels: base + per_key].view((1, 1) + spatial))
    masks: dict = {}
    for r in range(rounds):
        if r < len(mine):
            tile = mine[r]
            decoded = decode(samples[plan.latent_slices(tile)]).to(device=device, dtype=torch.float32)
            total, weights = views[(tile.grid, tile.batch)]
            if tile.whole:  # the item is this tile as decoded (ComfyUI applies no weights)
                total.copy_(decoded)
                weights.fill_(1.0)
            else:
                mask_key = (tuple(decoded.shape[2:]), plan.feather[tile.grid])
                if mask_key not in masks:
                    masks[mask_key] = feather_mask(*mask_key).to(device)
                mask = masks[mask_key]
                for d, start in enumerate(tile.out_start, start=2):
                    total = total.narrow(d, start, decoded.shape[d])
                    weights = weights.narrow(d, start, decoded.shape[d])
                total.add_(decoded * mask)
                weights.add_(mask)
        if on_round is not None:  # collective: every rank runs the same number of rounds
            on_round(r, rounds, rounds_done(owners, world_size, r + 1), len(plan.tiles))
    if world_size > 1:
        dist.reduce(sums, dst, group=group)
    if rank != dst:
        return None
    if output is None:
        output = torch.empty(plan.out_shape, dtype=torch.float32)
    for batch in range(plan.out_shape[0]):
        item = None
        for grid in range(len(plan.grids)):  # ComfyUI sums whole grids in order, then averages
            total, weights = views[(grid, batch)]
            blended = total / weights
            item = blended if item is None else item + blended
        if len(plan.grids) > 1:
            item = item / float(len(plan.grids))
        output[batch: batch + 1].copy_(item.cpu())
    return output
