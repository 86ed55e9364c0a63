"""Decode a tile plan on every rank of a torch.distributed group.

Work goes in rounds: in round r each rank decodes its r-th tile (`assign_tiles`), then
`on_round` runs on every rank (a place for collective interrupt checks and progress).
Tiles are decoded one ahead (`_Lookahead`): while the host blends tile r, the GPU already
works on tile r+1, and copies to and from the GPU are asynchronous, so the GPU never waits
for the host's blending (one tile ahead made the 1-GPU decode 1.2-1.5x faster than ComfyUI's).

Two ways to put the tiles together:
- `decode_tiles`: ranks send their tiles to rank `dst` (gloo), which blends them in plan
  order with ComfyUI's float order: bit for bit ComfyUI's tiled decode. Rank `dst`'s
  blending is serial, so this scales only while the blend is cheap next to the decode.
- `decode_tiles_partial` + `sum_partials`: every rank blends its own tiles, already
  divided by the summed weights, into a full-size float32 partial image on the host (a
  shared-memory file in the pool); the ranks then sum the partials, each a slice of them.
  Nothing travels per tile and no full-size buffer lives on a GPU (a GPU's peak stays that
  of one tile). Equal to `decode_tiles` up to float summation order (~1e-7 relative).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

from ..attention.collectives import cpu_group  # noqa: F401  (re-exported by comfy_para_attn.vae)
from .blend import Blender, blend_weights, release_caches, shared_feather_mask, tile_region
from .tiling import Tile, TilePlan, assign_tiles


def _one_decode(decode_fn):
    """The blend caches live for one decode (`blend.release_caches`), however it ends."""
    @functools.wraps(decode_fn)
    def wrapper(*args, **kwargs):
        try:
            return decode_fn(*args, **kwargs)
        finally:
            release_caches()
    return wrapper

DecodeFn = Callable[[torch.Tensor], torch.Tensor]
# on_round(round, rounds, tiles decoded on all ranks so far, tiles in the plan)
RoundFn = Callable[[int, int, int, int], None]
# ... and this rank's exception from the round's own work (None): it must raise given one
PartialRoundFn = Callable[[int, int, int, int, Optional[BaseException]], None]


def rounds_done(owners: tuple[int, ...], world_size: int, rounds_finished: int) -> int:
    """Tiles decoded on all ranks once `rounds_finished` rounds are over."""
    counts = [owners.count(r) for r in range(world_size)]
    return sum(min(rounds_finished, c) for c in counts)


class _Lookahead:
    """This rank's tiles, in order, produced on the device (`produce(tile)`: decode, maybe
    weigh) and brought to the host as float32; `get(i)` launches tile i+1 before waiting for
    tile i. On CUDA the copy to the host is asynchronous (pinned buffer + event), so no tile
    makes the host wait for the GPU before the next one is queued."""

    def __init__(self, tiles: Sequence[Tile], produce: Callable[[Tile], torch.Tensor], cuda: bool):
        self.tiles, self.produce, self.cuda = tiles, produce, cuda
        self.launched: dict[int, tuple[torch.Tensor, object]] = {}
        self.next = 0

    def _launch(self, i: int) -> None:
        produced = self.produce(self.tiles[i])
        if self.cuda and produced.is_cuda:
            host = torch.empty(produced.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(produced, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(produced.device))  # the copy's stream, not cuda:0's
            self.launched[i] = (host, done)
        else:
            self.launched[i] = (produced.to(device="cpu", dtype=torch.float32), None)

    def get(self, i: int) -> torch.Tensor:
        while self.next <= min(i + 1, len(self.tiles) - 1):
            self._launch(self.next)
            self.next += 1
        host, done = self.launched.pop(i)
        if done is not None:
            done.synchronize()
        return host


def _tile_latents(samples: torch.Tensor, plan: TilePlan, device):
    """(latent_of(tile), whether tiles decode on CUDA). On CUDA each tile's latent travels
    from pinned memory asynchronously (a copy from pageable memory would make the host wait
    for the GPU, and the whole latent on the GPU would raise its peak)."""
    cuda = device is not None and torch.device(device).type == "cuda"

    def latent_of(tile: Tile) -> torch.Tensor:
        z = samples[plan.latent_slices(tile)]
        if not cuda:
            return z
        if z.device.type != "cpu":  # a latent already on a GPU
            return z.to(device)
        return z.contiguous().pin_memory().to(device, non_blocking=True)

    return latent_of, cuda


def _my_tiles(plan: TilePlan, rank: int, world_size: int):
    owners = assign_tiles(plan, world_size)
    mine = [tile for tile, owner in zip(plan.tiles, owners) if owner == rank]
    rounds = max(owners.count(r) for r in range(world_size))
    return owners, mine, rounds


def _check_latent(samples: torch.Tensor, plan: TilePlan) -> None:
    if tuple(samples.shape) != plan.latent_shape:
        raise ValueError(f"latent has shape {tuple(samples.shape)}, the plan was made for {plan.latent_shape}")


@_one_decode
def decode_tiles(samples: torch.Tensor, plan: TilePlan, decode: DecodeFn, *, rank: int = 0,
                 world_size: int = 1, group=None, dst: int = 0, output: torch.Tensor | None = None,
                 on_round: RoundFn | None = None, device=None) -> torch.Tensor | None:
    """The blended decode [B, C, *out_spatial] (float32, CPU) on rank `dst`, None elsewhere.

    `decode(latent_tile)` returns the decoded tile [1, C, *spatial] (any device/dtype).
    `group`: a gloo group of `world_size` ranks (None: the default group); `rank` and `dst`
    are ranks within it. `output`: an optional float32 tensor to blend into. `device`: where
    `decode` runs (a CUDA device enables the asynchronous lookahead).
    """
    _check_latent(samples, plan)
    owners, mine, rounds = _my_tiles(plan, rank, world_size)
    ordinal = {}  # tile index -> round in which its owner decodes it
    seen = [0] * world_size
    for tile, owner in zip(plan.tiles, owners):
        ordinal[tile.index] = seen[owner]
        seen[owner] += 1
    latent_of, cuda = _tile_latents(samples, plan, device)
    tiles = _Lookahead(mine, lambda tile: decode(latent_of(tile)), cuda)
    blender = Blender(plan, output) if rank == dst else None
    held: dict[int, torch.Tensor] = {}
    sends = []
    cursor = 0
    for r in range(rounds):
        decoded = tiles.get(r) if r < len(mine) else None
        # Before any send of this round: a rank that stops here (interrupt) leaves no send
        # unmatched, since dst received every earlier round's tiles in that round.
        if on_round is not None:
            on_round(r, rounds, rounds_done(owners, world_size, r + 1), len(plan.tiles))
        if decoded is not None:
            if rank == dst:
                held[mine[r].index] = decoded
            else:
                # Keep only sends in flight: their (pinned) buffers go back as they complete.
                sends = [s for s in sends if not s[0].is_completed()] + _send(decoded.contiguous(), dst, group)
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


@_one_decode
def decode_tiles_partial(samples: torch.Tensor, plan: TilePlan, decode: DecodeFn, partial: torch.Tensor, *,
                         rank: int, world_size: int, on_round: PartialRoundFn | None = None, device=None) -> None:
    """Add this rank's share of the blended decode into `partial` (float32 [B, C, *out_spatial],
    zeros, on the host): each of its tiles times feather / (summed feathers of its grid there)
    / (number of grids), weighed on the device. The sum of every rank's partial is the
    blended decode. Every rank runs the same number of rounds (`on_round` may be collective),
    also after its own tile failed: the failure goes to that round's `on_round`, which must
    raise it (a collective one can make every rank stop there together)."""
    _check_latent(samples, plan)
    if tuple(partial.shape) != plan.out_shape or partial.dtype != torch.float32:
        raise ValueError(f"partial must be float32 {plan.out_shape}, got {partial.dtype} {tuple(partial.shape)}")
    owners, mine, rounds = _my_tiles(plan, rank, world_size)
    latent_of, cuda = _tile_latents(samples, plan, device)
    factors = _TileFactors(plan, pin=cuda)

    def weighed(tile: Tile) -> torch.Tensor:
        decoded = decode(latent_of(tile))
        if tuple(decoded.shape[2:]) != tile.out_size:
            raise ValueError(f"the VAE decoded a tile of latent size {tile.size} to {tuple(decoded.shape[2:])}, "
                             f"but its scale factors say {tile.out_size}: the plan does not fit this VAE")
        factor = factors.of(tile).to(decoded.device, non_blocking=True)
        return decoded.to(torch.float32) * factor

    tiles = _Lookahead(mine, weighed, cuda)
    for r in range(rounds):
        failed = None
        if r < len(mine):
            tile = mine[r]
            try:
                tile_region(partial[tile.batch: tile.batch + 1], tile).add_(tiles.get(r))
            except Exception as exc:  # out of memory, a VAE error: on_round decides who stops
                failed = exc
        try:
            if on_round is not None:
                on_round(r, rounds, rounds_done(owners, world_size, r + 1), len(plan.tiles), failed)
            if failed is not None:
                raise failed
        finally:
            failed = None  # its traceback holds this frame (the tiles) in a cycle


class _TileFactors:
    """Per tile, what its decoded values are multiplied by in a partial image: feather /
    summed feathers of its grid there / number of grids ([1, 1, *out_size], float32, CPU;
    pinned for an asynchronous copy when `pin`). A whole tile gets 1 / number of grids."""

    def __init__(self, plan: TilePlan, pin: bool):
        self.plan, self.pin = plan, pin
        self.weights = blend_weights(plan)

    def of(self, tile: Tile) -> torch.Tensor:
        scale = 1.0 / len(self.plan.grids)
        if tile.whole:
            factor = torch.full((1, 1) + tile.out_size, scale, dtype=torch.float32)
        else:
            mask = shared_feather_mask(tile.out_size, self.plan.feather[tile.grid])
            factor = mask / tile_region(self.weights[tile.grid], tile) * scale
        return factor.pin_memory() if self.pin else factor


def sum_partials(partials: Sequence[torch.Tensor], part: int, parts: int,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """partials[0] += partials[1:], on the `part`-th of `parts` equal slices (flattened), so
    that `parts` processes sharing the tensors (shared memory) sum them together; then
    `finish` (an elementwise function, e.g. the VAE's output scaling) replaces the slice."""
    flat = [p.view(-1) for p in partials]
    size = -(-flat[0].numel() // parts)
    begin, end = part * size, min((part + 1) * size, flat[0].numel())
    if begin >= end:
        return
    target = flat[0][begin:end]
    for other in flat[1:]:
        target.add_(other[begin:end])
    if finish is not None:
        target.copy_(finish(target))
