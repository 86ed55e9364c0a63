"""Parallel VAE Decode benchmark: 1-GPU tiled decode (in-process) vs the worker pool.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_parallel_vae.py --gpus 2
    python bench/bench_parallel_vae.py --tiny          # CPU smoke run, tiny VAEs, 2 CPU ranks

Random-weight VAEs with the real FLUX and HunyuanVideo architectures (comfy.sd.VAE detects
them from the state-dict keys, as with a checkpoint). Needs torch, the ComfyUI tree and
this package. Prints time, peak GiB per GPU, and the ratio against the 1-GPU tiled decode
measured in the same run; also the max abs difference between the two outputs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 1 << 30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout")
    parser.add_argument("--gpus", type=int, default=2, help="ranks for the parallel decode")
    parser.add_argument("--kinds", default="flux,hunyuan_video")
    parser.add_argument("--flux-size", default="2048x2048", help="HxW pixels")
    parser.add_argument("--video-size", default="544x960x33", help="HxWxframes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-comfy-reference", dest="comfy_reference", action="store_false",
                        help="skip timing ComfyUI's own tiled decode (VAE.decode_tiled, 1 GPU)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny VAEs")
    return parser.parse_args()


def setup(args):
    from comfy_para_attn.adapters.comfy.env import find_comfyui, make_importable

    path = args.comfyui or find_comfyui()
    if path is None:
        sys.exit("ComfyUI not found: pass --comfyui or set COMFYUI_PATH")
    make_importable(path, cpu=True if args.tiny else None)


def case_inputs(kind, args):
    import torch

    from comfy_para_attn.adapters.comfy.parallel_vae import TiledDecodeSettings
    from comfy_para_attn.testing import vae_models

    if args.tiny:
        vae = vae_models.tiny_comfy_vae(kind)
        shape = dict(height=9, width=11) if kind == "flux" else dict(frames=4, height=6, width=7)
        settings = TiledDecodeSettings(64, 16) if kind == "flux" else TiledDecodeSettings(32, 8, 8, 4)
        return vae, vae_models.latent(kind, **shape), settings
    vae = vae_models.full_size_comfy_vae(kind)
    g = torch.Generator().manual_seed(0)
    if kind == "flux":
        h, w = (int(v) for v in args.flux_size.split("x"))
        z = torch.randn(1, 16, h // 8, w // 8, generator=g)
        return vae, z, TiledDecodeSettings(512, 64)
    h, w, f = (int(v) for v in args.video_size.split("x"))
    z = torch.randn(1, 16, (f - 1) // 4 + 1, h // 8, w // 8, generator=g)
    # The reference tiles: 32 latent (256 px) with 8 (64 px) overlap, 8 latent frames with 2.
    return vae, z, TiledDecodeSettings(256, 64, 32, 8)


def timed(fn, repeats):
    import torch

    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times), out


def local_peak(reset=False):
    import torch

    if not torch.cuda.is_available():
        return 0
    peak = torch.cuda.max_memory_allocated()
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def run_case(kind, args, rows):
    import comfy.model_management

    from comfy_para_attn.adapters.comfy import parallel_vae

    vae, z, settings = case_inputs(kind, args)
    label = f"{kind} latent {tuple(z.shape)}"
    world = 2 if args.tiny else args.gpus
    plan = parallel_vae.plan_decode(vae, z, settings)

    def one_gpu():
        return parallel_vae.parallel_decode(vae, z, settings, gpus=1)

    one_gpu()  # warm-up: loads the VAE on the GPU
    local_peak(reset=True)
    base_s, base = timed(one_gpu, args.repeats)
    rows.append((label, "1 GPU tiled (in-process)", base_s, [local_peak(reset=True) / GIB], 1.0))
    if args.comfy_reference:
        # What ComfyUI's VAEDecodeTiled node runs, with the node's unit conversion.
        dims = z.ndim - 2
        (tile, overlap) = parallel_vae.latent_tiles(vae, settings, dims)
        temporal = dict(tile_t=tile[0], overlap_t=overlap[0]) if dims == 3 else {}

        def comfy_tiled():
            images = vae.decode_tiled(z, tile_x=tile[-1], tile_y=tile[-2], overlap=overlap[-1], **temporal)
            return images.reshape(-1, *images.shape[-3:])

        ref_s, ref = timed(comfy_tiled, args.repeats)
        rows.append((label, "ComfyUI decode_tiled (1 GPU)", ref_s, [local_peak(reset=True) / GIB], None))
        print(f"# {kind}: ours (1 GPU) vs ComfyUI decode_tiled max abs diff {(ref - base).abs().max().item():.3g}")
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    device = "cpu" if args.tiny else "cuda"

    def parallel():
        return parallel_vae.parallel_decode(vae, z, settings, gpus=world)

    began = time.perf_counter()
    parallel()  # warm-up: starts the pool, sends and caches the VAE
    warm_s = time.perf_counter() - began
    pool = parallel_vae.shared_pool(world, device)
    pool.run("comfy_para_attn.adapters.comfy.vae_jobs:cuda_peak_memory", None, timeout_s=60)
    par_s, out = timed(parallel, args.repeats)
    peaks = pool.run("comfy_para_attn.adapters.comfy.vae_jobs:cuda_peak_memory", None, timeout_s=60)
    rows.append((label, f"{world} ranks (pool; first run {warm_s:.1f} s)", par_s, [p / GIB for p in peaks],
                 base_s / par_s))
    print(f"# {kind}: {len(plan.tiles)} tiles; parallel vs 1-GPU max abs diff {(out - base).abs().max().item():.3g}")


def main():
    args = parse_args()
    setup(args)
    import logging

    logging.basicConfig(format="# %(name)s: %(message)s")
    logging.getLogger("comfy_para_attn").setLevel(logging.INFO)  # the pool's per-rank phases
    import torch

    from comfy_para_attn.pool import shutdown_pool

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.tiny else "cpu"
    print(f"# device: {device} x{torch.cuda.device_count() if device != 'cpu' else 0}; torch {torch.__version__}")
    rows = []
    try:
        for kind in args.kinds.split(","):
            run_case(kind, args, rows)
    finally:
        shutdown_pool()
    # Speedups against our 1-GPU tiled decode and against ComfyUI's, same case, same run.
    base = {label: seconds for label, mode, seconds, _, _ in rows if mode.startswith("1 GPU tiled")}
    comfy = {label: seconds for label, mode, seconds, _, _ in rows if mode.startswith("ComfyUI")}
    print(f"{'case':<38} {'mode':<40} {'time s':>8} {'peak GiB per GPU':>18} {'vs ours 1':>9} {'vs ComfyUI':>10}")
    for label, mode, seconds, peaks, _ in rows:
        peak_text = "/".join(f"{p:.2f}" for p in peaks)
        versus = f"{comfy[label] / seconds:>9.2f}x" if label in comfy else f"{'-':>10}"
        print(f"{label:<38} {mode:<40} {seconds:>8.3f} {peak_text:>18} {base[label] / seconds:>8.2f}x {versus}")


if __name__ == "__main__":
    main()
