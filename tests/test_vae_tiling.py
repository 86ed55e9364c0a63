"""Tile plans, blending weights and the rank loop of the parallel VAE decode (unit tier:
plain torch, fake local decoders, 2 gloo ranks)."""
import pytest
import torch

from comfy_para_attn.testing.distributed import run_ranks
from comfy_para_attn.testing.vae_models import nearest_decoder
from comfy_para_attn.vae import (TiledDecodeSettings, TileGrid, assign_tiles, blend_tiles, comfy_grids,
                                 decode_tiles, decode_tiles_partial, feather_mask, latent_tile_sizes, plan_tiles,
                                 sum_partials)
from comfy_para_attn.vae.blend import blend_weights, shared_feather_mask

CAUSAL = (lambda d, n: max(0, 4 * n - 3) if d == 0 else 8 * n), (lambda d, p: (4, 8, 8)[d] * p)
IMAGE = (lambda d, n: 8 * n), None


def _plan(shape, grids, axes):
    scale, position = axes
    return plan_tiles(shape, grids, scale=scale, position=position)


def _tiled(z, plan, decoder):
    return blend_tiles(plan, [decoder(z[plan.latent_slices(t)]) for t in plan.tiles])


@pytest.mark.parametrize("shape", [(1, 16, 13, 10), (2, 16, 9, 4), (1, 16, 3, 3)])
def test_2d_comfy_grids_cover_the_image_and_match_a_whole_decode(shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    decoder = nearest_decoder(8)
    plan = _plan(shape, comfy_grids(2, (4, 4), (1, 1)), IMAGE)
    assert plan.out_shape == (shape[0], 3, shape[2] * 8, shape[3] * 8)
    assert [g.tile for g in plan.grids] == [(8, 2), (2, 8), (4, 4)]
    out = _tiled(z, plan, decoder)
    # A local decoder agrees on every overlap, so the weighted mean is the whole decode.
    torch.testing.assert_close(out, decoder(z), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(1, 16, 5, 9, 11), (2, 16, 3, 5, 7), (1, 16, 1, 2, 3)])
def test_3d_causal_tiles_match_a_whole_decode(shape):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    decoder = nearest_decoder(8, temporal=4)
    plan = _plan(shape, [TileGrid((2, 4, 4), (1, 1, 1))], CAUSAL)
    assert plan.out_spatial == (max(0, 4 * shape[2] - 3), shape[3] * 8, shape[4] * 8)
    out = _tiled(z, plan, decoder)
    torch.testing.assert_close(out, decoder(z), atol=1e-6, rtol=0)


def test_small_latent_is_one_whole_tile_without_weights():
    plan = _plan((1, 16, 3, 3), [TileGrid((4, 4), (1, 1))], IMAGE)
    assert len(plan.tiles) == 1 and plan.tiles[0].whole
    decoded = torch.randn(1, 3, 24, 24)
    assert torch.equal(blend_tiles(plan, [decoded]), decoded)


def test_uneven_sizes_end_with_a_shorter_tile():
    plan = _plan((1, 16, 10, 4), [TileGrid((4, 4), (1, 1))], IMAGE)
    starts = [(t.start[0], t.size[0]) for t in plan.tiles]
    assert starts == [(0, 4), (3, 4), (6, 4)]  # ComfyUI: range(0, 10 - 1, 3) -> 0, 3, 6
    assert plan.tiles[-1].out_start == (48, 0)


def test_feather_mask_ramps_both_ends():
    mask = feather_mask((6,), (2,))[0, 0]
    assert mask.tolist() == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5]
    assert feather_mask((3,), (3,)).eq(1).all()  # a feather as long as the tile is skipped


def test_assignment_is_balanced_and_deterministic():
    plan = _plan((1, 16, 13, 10), comfy_grids(2, (4, 4), (1, 1)), IMAGE)
    owners = assign_tiles(plan, 2)
    assert owners == assign_tiles(plan, 2)
    counts = [owners.count(r) for r in range(2)]
    assert abs(counts[0] - counts[1]) <= 2 and sum(counts) == len(plan.tiles)
    assert set(assign_tiles(plan, 1)) == {0}


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="must be larger than the overlap"):
        _plan((1, 16, 9, 9), [TileGrid((2, 2), (2, 2))], IMAGE)
    with pytest.raises(ValueError, match="overlap .* must be smaller than tile_size"):
        latent_tile_sizes(TiledDecodeSettings(256, 256), 2, 8)
    with pytest.raises(ValueError, match="temporal_overlap .* must be smaller"):
        latent_tile_sizes(TiledDecodeSettings(256, 32, 8, 8), 3, 8, 4)
    with pytest.raises(ValueError, match="video"):
        latent_tile_sizes(TiledDecodeSettings(), 3, 8, None)
    # what VAEDecodeTiled reduces silently (the node logs it; the library refuses it)
    with pytest.raises(ValueError, match=r"overlap \(48 px\) is more than tile_size / 4.*would use 16 px; pass at most 16"):
        latent_tile_sizes(TiledDecodeSettings(64, 48), 2, 8)
    with pytest.raises(ValueError, match="temporal_overlap .12 frames. is more than temporal_size / 2.*at most 8"):
        latent_tile_sizes(TiledDecodeSettings(256, 32, 16, 12), 3, 8, 4)


def test_node_units_convert_like_vae_decode_tiled():
    assert latent_tile_sizes(TiledDecodeSettings(512, 64), 2, 8) == ((64, 64), (8, 8))
    assert latent_tile_sizes(TiledDecodeSettings(64, 32), 2, 8, strict=False) == ((8, 8), (2, 2))  # overlap -> tile/4
    assert latent_tile_sizes(TiledDecodeSettings(256, 64, 32, 8), 3, 8, 4) == ((8, 32, 32), (2, 8, 8))
    assert latent_tile_sizes(TiledDecodeSettings(256, 64, 8, 4), 3, 8, 4) == ((2, 32, 32), (1, 8, 8))


VIDEO = ((2, 16, 3, 5, 7), [TileGrid((2, 4, 4), (1, 1, 1))], True)
IMAGE_CASE = ((1, 16, 11, 9), comfy_grids(2, (4, 4), (1, 1)), False)
# Two items that fit the square grid whole but not the tall and wide ones.
WHOLE_AND_TILED = ((2, 16, 3, 3), comfy_grids(2, (4, 4), (1, 1)), False)


def tile_dependent(decoder):
    """`decoder` plus a term that depends on the whole tile: overlapping tiles disagree, so
    the result depends on the blending weights (a local decoder agrees everywhere and would
    hide wrong weights)."""
    return lambda z: decoder(z) + z.mean() * 0.5


def _rank_decode(rank, world_size, cases, partial_dir=None):
    """Each case decoded on this rank: with `partial_dir`, the pool's way (own partial in a
    shared file, barrier, every rank sums a slice), returning rank 0's summed file."""
    import torch.distributed as dist

    from comfy_para_attn.pool import shm

    results = []
    for case, (shape, grids, video) in enumerate(cases):
        z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        decoder = tile_dependent(nearest_decoder(8, temporal=4 if video else None))
        plan = _plan(shape, grids, CAUSAL if video else IMAGE)
        rounds = []
        record = lambda r, n, done, total, failed=None: rounds.append((r, done, total))  # noqa: E731
        if partial_dir is None:
            out = decode_tiles(z, plan, decoder, rank=rank, world_size=world_size, on_round=record)
        else:
            partials = [shm.map_float32(f"{partial_dir}/{case}-{r}", plan.out_shape) for r in range(world_size)]
            decode_tiles_partial(z, plan, decoder, partials[rank], rank=rank, world_size=world_size,
                                 on_round=record)
            if world_size > 1:
                dist.barrier()
            sum_partials(partials, rank, world_size)
            if world_size > 1:
                dist.barrier()
            out = partials[0].clone() if rank == 0 else None
        # The masks and weight maps were cached for this decode only (image-sized otherwise kept).
        assert shared_feather_mask.cache_info().currsize == 0 and blend_weights.cache_info().currsize == 0
        results.append((out, rounds))
    return results


def test_two_gloo_ranks_equal_one():
    cases = [IMAGE_CASE, VIDEO, WHOLE_AND_TILED]
    singles = _rank_decode(0, 1, cases)
    ranks = run_ranks(_rank_decode, 2, cases, timeout=120)  # one spawn for both cases
    for (single, single_rounds), (out0, rounds0), (out1, rounds1) in zip(singles, *ranks):
        assert out1 is None
        assert torch.equal(out0, single)  # same tiles, same order: bit for bit
        assert len(rounds0) == len(rounds1) < len(single_rounds)  # every rank runs every round
        assert rounds0[-1][1:] == single_rounds[-1][1:]  # progress ends at all tiles


def _zero_files(directory, cases, world_size):
    for case, (shape, grids, video) in enumerate(cases):
        out_shape = _plan(shape, grids, CAUSAL if video else IMAGE).out_shape
        for r in range(world_size):
            (directory / f"{case}-{r}").write_bytes(bytes(4 * torch.Size(out_shape).numel()))


@pytest.mark.parametrize("world_size", [1, 2])
def test_partial_images_summed_in_shared_files_equal_the_blend(tmp_path, world_size):
    """The pool's path: each rank blends its tiles, pre-divided by the weights, into its own
    shared file; the ranks sum slices. Equal to the ComfyUI-order blend up to float order."""
    cases = [IMAGE_CASE, VIDEO, WHOLE_AND_TILED]
    singles = _rank_decode(0, 1, cases)
    _zero_files(tmp_path, cases, world_size)
    if world_size == 1:
        ranks = [_rank_decode(0, 1, cases, str(tmp_path))]
    else:
        ranks = run_ranks(_rank_decode, 2, cases, str(tmp_path), timeout=120)
    for (single, _), *per_rank in zip(singles, *ranks):
        out0, rounds0 = per_rank[0]
        assert torch.isfinite(out0).all() and single.abs().mean() > 1e-3
        assert (out0 - single).abs().max().item() < 1e-5
        assert all(rounds == rounds0 for _, rounds in per_rank)  # same rounds on every rank


def test_sum_partials_slices_cover_everything_once():
    parts = [torch.randn(2, 3, 7, 5) for _ in range(3)]
    expected = torch.clamp((parts[0] + parts[1] + parts[2] + 1.0) / 2.0, 0.0, 1.0)
    for part in range(4):  # 4 slices of 210 elements: the last is shorter
        sum_partials(parts, part, 4, finish=lambda x: torch.clamp((x + 1.0) / 2.0, 0.0, 1.0))
    torch.testing.assert_close(parts[0], expected, rtol=0, atol=1e-6)


def test_partial_decode_rejects_a_decoder_that_does_not_fit_the_plan():
    shape, grids, _ = IMAGE_CASE
    plan = _plan(shape, grids, IMAGE)
    z = torch.randn(shape)
    wrong = nearest_decoder(4)  # upscales by 4, the plan says 8
    with pytest.raises(ValueError, match="plan does not fit this VAE"):
        decode_tiles_partial(z, plan, wrong, torch.zeros(plan.out_shape), rank=0, world_size=1)


def test_a_tile_failure_goes_to_its_rounds_check_and_frees_the_round():
    """The round's check gets the failure (a collective one stops every rank there) and the
    failed round's tensors are freed at once, not held by the exception's reference cycle."""
    import gc
    import weakref

    shape, grids, _ = IMAGE_CASE
    plan = _plan(shape, grids, IMAGE)
    decoder, watched, checks = nearest_decoder(8), [], []

    def failing(latent_tile):
        out = decoder(latent_tile)
        watched.append(weakref.ref(out))
        if len(watched) == 3:
            raise torch.OutOfMemoryError("injected")
        return out

    def on_round(r, rounds, done, total, failed):
        checks.append((r, type(failed).__name__))
        if failed is not None:
            raise RuntimeError("stopped every rank") from failed

    gc.disable()
    try:
        with pytest.raises(RuntimeError, match="stopped every rank"):
            decode_tiles_partial(torch.randn(shape), plan, failing, torch.zeros(plan.out_shape), rank=0,
                                 world_size=1, on_round=on_round)
        assert len(checks) >= 2 and checks[-1][1] == "OutOfMemoryError"
        assert all(name == "NoneType" for _, name in checks[:-1])
        assert all(ref() is None for ref in watched)
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lookahead_equals_the_cpu_decode():
    """On CUDA tiles travel asynchronously (pinned copies, events, one tile ahead): the result
    must not change, for the exact blend and for the partial image. The decoder keeps the GPU
    busy before each tile (a missing wait would read unfinished copies), and runs on the last
    GPU without making it current (events must be recorded on the tile's device)."""
    device = f"cuda:{torch.cuda.device_count() - 1}"

    def slow(decoder):
        def decode(z):
            with torch.cuda.device(z.device):
                torch.cuda._sleep(20_000_000)  # ~10 ms of GPU time before the tile is produced
            return decoder(z)
        return decode

    for shape, grids, video in [IMAGE_CASE, VIDEO, WHOLE_AND_TILED]:
        z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
        decoder = tile_dependent(nearest_decoder(8, temporal=4 if video else None))
        plan = _plan(shape, grids, CAUSAL if video else IMAGE)
        on_cpu = decode_tiles(z, plan, decoder)
        on_cuda = decode_tiles(z, plan, slow(decoder), device=device)
        torch.testing.assert_close(on_cuda, on_cpu, rtol=0, atol=1e-5)  # CUDA's tanh may differ by an ulp
        partial = torch.zeros(plan.out_shape)
        decode_tiles_partial(z, plan, slow(decoder), partial, rank=0, world_size=1, device=device)
        assert torch.isfinite(partial).all() and (partial - on_cpu).abs().max().item() < 1e-5
