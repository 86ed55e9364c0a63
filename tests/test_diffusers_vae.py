"""Parallel tiled decode for diffusers' AutoencoderKL and AutoencoderKLHunyuanVideo (tiny,
random): 2 gloo ranks and one process equal a plain tiled decode written out below (the
VAE's own decode per tile, ComfyUI's feathered average), and a tile that covers the whole
latent equals the VAE's own decode."""
import itertools

import pytest
import torch

pytest.importorskip("diffusers")

from comfy_para_attn.adapters.diffusers.vae import parallel_tiled_decode  # noqa: E402
from comfy_para_attn.testing.distributed import run_ranks  # noqa: E402
from comfy_para_attn.testing.vae_models import latent, tiny_diffusers_vae  # noqa: E402

CASES = {
    "flux": (dict(height=9, width=11), dict(tile_size=64, overlap=16)),
    "hunyuan_video": (dict(frames=4, height=6, width=7), dict(tile_size=32, overlap=8, temporal_size=8,
                                                             temporal_overlap=4)),
}


RUNS = [("flux", "single"), ("flux", "comfy"), ("hunyuan_video", "single")]


def _decode(rank, world_size, runs):
    outputs = []
    for kind, grids in runs:
        size, settings = CASES[kind]
        vae = tiny_diffusers_vae(kind)
        outputs.append(parallel_tiled_decode(vae, latent(kind, **size), grids=grids, all_ranks=True, **settings))
    return outputs


def _plain_tiled(decode, z, tile, overlap, out_size, out_pos):
    """The reference: every tile decoded on its own, weighted by a mask that ramps
    (t + 1) / feather over each end, summed and divided by the summed weights."""
    dims = z.ndim - 2
    full = [out_size(d, z.shape[d + 2]) for d in range(dims)]
    if all(z.shape[d + 2] <= tile[d] for d in range(dims)):
        return decode(z).float()
    acc = torch.zeros([1, 3] + full)
    weight = torch.zeros([1, 3] + full)
    starts = [range(0, z.shape[d + 2] - overlap[d], tile[d] - overlap[d]) if z.shape[d + 2] > tile[d] else [0]
              for d in range(dims)]
    for corner in itertools.product(*starts):
        piece, origin = z, []
        for d, start in enumerate(corner):
            start = max(0, min(z.shape[d + 2] - overlap[d], start))
            piece = piece.narrow(d + 2, start, min(tile[d], z.shape[d + 2] - start))
            origin.append(out_pos(d, start))
        decoded = decode(piece).float()
        mask = torch.ones_like(decoded)
        for d in range(dims):
            ramp, n = out_size(d, overlap[d]), mask.shape[d + 2]
            for t in range(ramp if ramp < n else 0):
                mask.narrow(d + 2, t, 1).mul_((t + 1) / ramp)
                mask.narrow(d + 2, n - 1 - t, 1).mul_((t + 1) / ramp)
        a, w = acc, weight
        for d in range(dims):
            a, w = a.narrow(d + 2, origin[d], mask.shape[d + 2]), w.narrow(d + 2, origin[d], mask.shape[d + 2])
        a.add_(decoded * mask)
        w.add_(mask)
    return acc / weight


def _reference(kind, grids):
    """ComfyUI's tiled decode of the case, from `_plain_tiled` and the VAE's own decode."""
    size, settings = CASES[kind]
    vae, z = tiny_diffusers_vae(kind), latent(kind, **size)
    decode = lambda piece: vae.decode(piece).sample  # noqa: E731
    tile, overlap = settings["tile_size"] // 8, settings["overlap"] // 8
    if kind == "flux":
        scale = lambda d, n: n * 8  # noqa: E731
        if grids == "single":
            return _plain_tiled(decode, z, (tile, tile), (overlap, overlap), scale, scale)
        shapes = [(tile * 2, tile // 2), (tile // 2, tile * 2), (tile, tile)]  # (H, W), ComfyUI's order
        return sum(_plain_tiled(decode, z, shape, (overlap, overlap), scale, scale) for shape in shapes) / 3.0
    t_tile = settings["temporal_size"] // 4
    t_overlap = min(t_tile // 2, settings["temporal_overlap"] // 4)
    size = lambda d, n: max(0, (n - 1) * 4 + 1) if d == 0 else n * 8  # noqa: E731  causal in time
    position = lambda d, p: p * (4 if d == 0 else 8)  # noqa: E731
    return _plain_tiled(decode, z, (t_tile, tile, tile), (t_overlap, overlap, overlap), size, position)


def test_two_ranks_and_one_equal_a_plain_tiled_decode():
    singles = _decode(0, 1, RUNS)  # one spawn for every case: importing diffusers is slow
    ranks = run_ranks(_decode, 2, RUNS, timeout=120)
    with torch.no_grad():
        for (kind, grids), single, out0, out1 in zip(RUNS, singles, *ranks):
            expected = _reference(kind, grids)
            assert torch.isfinite(expected).all() and expected.std() > 0.05, (kind, grids)
            torch.testing.assert_close(single, expected, atol=1e-5, rtol=0, msg=f"{kind} {grids}")
            torch.testing.assert_close(out0, expected, atol=1e-5, rtol=0, msg=f"{kind} {grids}")
            assert torch.equal(out0, out1)  # all_ranks: the same image everywhere


@pytest.mark.parametrize("kind", ["flux", "hunyuan_video"])
def test_one_tile_is_the_vaes_own_decode(kind):
    size, _ = CASES[kind]
    vae, z = tiny_diffusers_vae(kind), latent(kind, **size)
    with torch.no_grad():
        whole = vae.decode(z).sample
        out = parallel_tiled_decode(vae, z, tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8)
    assert torch.isfinite(whole).all() and whole.std() > 0.05
    torch.testing.assert_close(out, whole.float(), atol=1e-6, rtol=0)


def test_bad_inputs_are_clear_errors():
    vae = tiny_diffusers_vae("flux")
    with pytest.raises(ValueError, match="has 4 channels but this VAE takes 16"):
        parallel_tiled_decode(vae, torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="overlap .* must be smaller than tile_size"):
        parallel_tiled_decode(vae, torch.randn(1, 16, 8, 8), tile_size=64, overlap=64)
    with pytest.raises(ValueError, match="image latents"):
        parallel_tiled_decode(vae, torch.randn(1, 16, 2, 8, 8))
