"""Parallel tiled decode for diffusers' AutoencoderKL and AutoencoderKLHunyuanVideo (tiny,
random): 2 gloo ranks equal one process with the same tiles and blending."""
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


def test_two_ranks_equal_one():
    singles = _decode(0, 1, RUNS)  # one spawn for every case: importing diffusers is slow
    ranks = run_ranks(_decode, 2, RUNS, timeout=120)
    for (kind, grids), single, out0, out1 in zip(RUNS, singles, *ranks):
        size, _ = CASES[kind]
        whole = tiny_diffusers_vae(kind).decode(latent(kind, **size)).sample
        assert single.shape == whole.shape and single.std() > 0.05, (kind, grids)
        torch.testing.assert_close(out0, single, atol=1e-5, rtol=0, msg=f"{kind} {grids}")
        assert torch.equal(out0, out1)  # all_ranks: the same image everywhere


def test_bad_inputs_are_clear_errors():
    vae = tiny_diffusers_vae("flux")
    with pytest.raises(ValueError, match="has 4 channels but this VAE takes 16"):
        parallel_tiled_decode(vae, torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="overlap .* must be smaller than tile_size"):
        parallel_tiled_decode(vae, torch.randn(1, 16, 8, 8), tile_size=64, overlap=64)
    with pytest.raises(ValueError, match="image latents"):
        parallel_tiled_decode(vae, torch.randn(1, 16, 2, 8, 8))
