"""Worker side of Parallel VAE Decode: jobs that run inside the pool's worker processes
(the pool's init job, `worker_jobs.init_worker`, has made ComfyUI importable).

`decode` rebuilds the VAE (cached by weight fingerprint, next to Context Parallel's model),
decodes this rank's tiles and blends them into its own shared-memory partial image (one
file per rank, made by the controller); then the ranks sum the partials into rank 0's file
and apply the VAE's output scaling, each a slice. Every rank checks the interrupt once per
round, together with whether a rank's tile failed (out of memory, say): then every rank stops
in that round and the pool, with the diffusion model it holds, stays.
"""
from __future__ import annotations

import time

import torch

from ...vae import cpu_group, decode_tiles_partial, sum_partials
from ...vae.tiling import assign_tiles


def vae_from_state_dict(state_dict, dtype=None):
    """The default rebuild: comfy.sd.VAE detects the VAE type from the state dict's keys."""
    import comfy.sd

    return comfy.sd.VAE(sd=dict(state_dict), dtype=dtype)


class VAENotRebuildable(RuntimeError):
    """The workers' rebuild of a VAE from its weights is not ComfyUI's VAE: decode it in-process."""


def cached_vae(ctx, recipe: dict):
    from ...pool import transfer
    from ...pool.worker import resolve_job
    from .worker_jobs import drop_cached

    key = ("vae", recipe["fingerprint"])
    if key in ctx.cache:
        return ctx.cache[key]
    drop_cached(ctx, "vae")  # one VAE at a time
    ctx.heartbeat()
    builder = resolve_job(recipe["builder"])
    vae = builder(transfer.load_tensors(recipe["weights"]), recipe["dtype"], **recipe["builder_kwargs"])
    built = type(vae.first_stage_model).__name__
    if built != recipe["model_class"]:
        raise VAENotRebuildable(f"rebuilding the VAE from its weights gave a {built}, but ComfyUI's VAE is a "
                                f"{recipe['model_class']}; this VAE type cannot be decoded in parallel yet")
    ctx.cache[key] = vae
    return vae


def decode(ctx, payload):
    import torch.distributed as dist

    from ...pool import shm
    from .parallel_vae import load_for_tiles, tile_decoder

    began = time.perf_counter()
    plan = payload["plan"]

    def set_up():
        vae = cached_vae(ctx, payload["vae"])
        load_for_tiles(vae, plan)
        # This rank reserves its own image's pages (in parallel with the other ranks).
        return vae, [shm.map_float32(path, plan.out_shape, reserve=rank == ctx.rank, what="the decoded image")
                     for rank, path in enumerate(payload["partial_paths"])]

    vae, partials = ctx.run_agreed(set_up)

    def on_round(r, rounds, done, total, failed):
        ctx.check_interrupt(failed=failed)  # collective: every rank stops in the same round
        ctx.report_progress(done, total)

    loaded = time.perf_counter()
    with torch.inference_mode(), ctx.host_threads():
        decode_tiles_partial(payload["samples"], plan, tile_decoder(vae), partials[ctx.rank], rank=ctx.rank,
                             world_size=ctx.world_size, on_round=on_round, device=ctx.device)
    decoded = time.perf_counter()
    # A collective (it stays one: see WorkerContext.check_interrupt): the barrier that makes
    # every partial complete before anyone sums.
    ctx.check_interrupt()
    waited = time.perf_counter()
    # process_output is elementwise for image and video VAEs: each rank scales its slice.
    with ctx.host_threads():
        sum_partials(partials, ctx.rank, ctx.world_size, finish=vae.process_output)
    summed = time.perf_counter()
    phases = {"load_s": loaded - began, "decode_s": decoded - loaded, "wait_s": waited - decoded,
              "sum_s": summed - waited}
    every = [None] * ctx.world_size
    dist.all_gather_object(every, phases, group=ctx.host_group)
    if ctx.rank != 0:
        return None
    owners = assign_tiles(plan, ctx.world_size)
    return {"tiles_per_rank": [owners.count(r) for r in range(ctx.world_size)], "phases": every}


def cuda_peak_memory(ctx, payload):
    """Every rank's peak CUDA memory (bytes) since the last call (benchmarks); resets it."""
    import torch.distributed as dist

    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    peaks = [None] * ctx.world_size
    dist.all_gather_object(peaks, peak, group=cpu_group())
    return peaks
