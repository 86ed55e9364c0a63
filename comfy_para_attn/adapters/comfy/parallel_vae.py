"""Parallel tiled VAE decode for ComfyUI: the tiles of `VAE.decode_tiled` spread over the
worker pool's ranks, blended with ComfyUI's weights.

The output equals ComfyUI's `VAEDecodeTiled` node (`VAE.decode_tiled`): 2D latents use
`decode_tiled_` (three tile grids, averaged), video latents `decode_tiled_3d`. Controller
side (the ComfyUI process): validate, plan the tiles, publish the VAE's weights once per
fingerprint, run one job on the same pool as Context Parallel (same layout and init job),
and read the image from shared memory, where the ranks blended and summed it (equal to
ComfyUI's up to float summation order). With one rank the decode runs here, in-process,
with the same tiles and blending, bit for bit ComfyUI's. Worker side: `vae_jobs.py`.
"""
from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path

import torch

from ...vae import TilePlan, comfy_grids, decode_tiles, plan_tiles
from ...vae.tiling import TiledDecodeSettings, comfy_overlaps, latent_tile_sizes, tile_cost

log = logging.getLogger("comfy_para_attn")
# VAEs (their first_stage_model) the workers could not rebuild: decoded in-process from then on
_not_rebuildable: "weakref.WeakSet" = weakref.WeakSet()

DEFAULT_REBUILD = ("comfy_para_attn.adapters.comfy.vae_jobs:vae_from_state_dict", {})
JOB = "comfy_para_attn.adapters.comfy.vae_jobs:decode"


def latent_tiles(vae, settings: TiledDecodeSettings, dims: int):
    """(tile, overlap) in latent elements, as VAEDecodeTiled converts the node's inputs: a
    too large overlap is reduced as there (said in the log), not refused."""
    used = dict(zip(("overlap", "temporal_overlap"), comfy_overlaps(settings)))
    changed = [f"{name} {getattr(settings, name)} -> {value}" for name, value in used.items()
               if value != getattr(settings, name) and (dims == 3 or name == "overlap")]
    if changed:
        log.warning("Parallel VAE Decode: %s, reduced as VAE Decode (Tiled) does (overlap to at most "
                    "tile_size / 4, temporal_overlap halved when above temporal_size / 2)", ", ".join(changed))
    return latent_tile_sizes(settings, dims, vae.spacial_compression_decode(), vae.temporal_compression_decode(),
                             strict=False)


def _axis_fns(vae, dims: int):
    """scale(dim, n) and position(dim, p) of tiled_scale_multidim for this VAE's decode."""
    ratios = vae.upscale_ratio if isinstance(vae.upscale_ratio, (tuple, list)) else [vae.upscale_ratio] * dims
    formulas = vae.upscale_index_formula or ratios
    formulas = formulas if isinstance(formulas, (tuple, list)) else [formulas] * dims
    if len(ratios) != dims or len(formulas) != dims:
        raise ValueError(f"this VAE's upscale ratios {ratios} do not fit a latent with {dims} spatial dims")

    def apply(table, d, n):
        return table[d](n) if callable(table[d]) else table[d] * n

    return (lambda d, n: apply(ratios, d, n)), (lambda d, p: apply(formulas, d, p))


def plan_decode(vae, samples: torch.Tensor, settings: TiledDecodeSettings) -> TilePlan:
    """Check the latent against the VAE and plan ComfyUI's tiles for it (ValueError says
    what is wrong)."""
    vae.throw_exception_if_invalid()
    dims = samples.ndim - 2
    if getattr(vae, "extra_1d_channel", None) is not None or dims not in (2, 3):
        raise ValueError(f"Parallel VAE Decode supports image and video VAEs (latent [B, C, H, W] or "
                         f"[B, C, T, H, W]); got a latent of shape {tuple(samples.shape)}")
    if dims != getattr(vae, "latent_dim", dims):
        want = "[B, C, T, H, W] (video)" if vae.latent_dim == 3 else "[B, C, H, W] (image)"
        raise ValueError(f"this VAE decodes latents of shape {want}, got {tuple(samples.shape)}")
    if samples.shape[1] != vae.latent_channels:
        raise ValueError(f"the latent has {samples.shape[1]} channels but this VAE takes "
                         f"{vae.latent_channels}: it belongs to a different model family")
    tile, overlap = latent_tiles(vae, settings, dims)
    scale, position = _axis_fns(vae, dims)
    return plan_tiles(samples.shape, comfy_grids(dims, tile, overlap), scale=scale, position=position,
                      out_channels=vae.output_channels)


def tile_decoder(vae):
    """ComfyUI's decode function for one tile (as in VAE.decode_tiled_ / decode_tiled_3d)."""
    return lambda z: vae.first_stage_model.decode(z.to(vae.vae_dtype).to(vae.device)).float()


def tile_memory(vae, plan: TilePlan) -> int:
    """ComfyUI's estimate of the memory decoding the largest tile takes."""
    largest = max(plan.tiles, key=tile_cost)
    return int(vae.memory_used_decode((1, plan.latent_shape[1]) + largest.size, vae.vae_dtype))


def load_for_tiles(vae, plan: TilePlan) -> None:
    """Load the VAE on its device, reserving memory for the largest tile (ComfyUI reserves
    for the whole latent, which would push other models off the GPU needlessly)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([vae.patcher], memory_required=tile_memory(vae, plan),
                                           force_full_load=vae.disable_offload)


def to_image(vae, blended: torch.Tensor, processed: bool = False) -> torch.Tensor:
    """VAEDecodeTiled's output: process_output (unless `processed`), channels last, video
    frames as a batch."""
    images = (blended if processed else vae.process_output(blended)).movedim(1, -1)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


def decode_in_process(vae, samples: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """World size 1: the same tiles and blending here, with a progress bar and interrupt;
    returns the image as `to_image` makes it."""
    import comfy.model_management
    import comfy.utils

    load_for_tiles(vae, plan)
    pbar = comfy.utils.ProgressBar(len(plan.tiles))

    def on_round(r, rounds, done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total)

    with torch.inference_mode():  # newer ComfyUI's process_output works in place: on an inference tensor, here
        return to_image(vae, decode_tiles(samples, plan, tile_decoder(vae), on_round=on_round, device=vae.device))


def _publish_vae(vae) -> tuple[str, object]:
    from .published import publish_weights

    model = vae.first_stage_model
    return publish_weights(model, model.state_dict, "vae")


def vae_recipe(vae) -> dict:
    """What a worker needs to rebuild this VAE: weights, dtype, and how to build it."""
    fingerprint, handle = _publish_vae(vae)
    builder, kwargs = getattr(vae, "para_attn_rebuild", DEFAULT_REBUILD)
    return {"fingerprint": fingerprint, "weights": handle, "dtype": vae.vae_dtype, "builder": builder,
            "builder_kwargs": dict(kwargs), "model_class": type(vae.first_stage_model).__name__}


# --- the pool run ---------------------------------------------------------------------------

def shared_pool(world: int, device: str):
    """The pool Context Parallel uses for this layout (the same one, not a second pool)."""
    from .comfy_pool import comfy_pool

    return comfy_pool(world, device)


def decode_in_pool(vae, samples: torch.Tensor, plan: TilePlan, world: int, device: str,
                   timeout_s: float = 600.0) -> torch.Tensor:
    import comfy.model_management
    import comfy.utils

    from ...pool import PoolInterrupted, shm
    from ...pool.errors import WorkerFailure, with_hint

    from .memory import make_room_for_workers
    from .published import is_resident, mark_resident

    recipe = vae_recipe(vae)
    payload = {"vae": recipe, "samples": samples.detach().to("cpu"), "plan": plan}
    pool = shared_pool(world, device)
    if device == "cuda":  # rank 0 shares ComfyUI's GPU
        resident = is_resident(pool, "vae", recipe["fingerprint"])
        make_room_for_workers(world, tile_memory(vae, plan) + (0 if resident else recipe["weights"].nbytes),
                              "Parallel VAE Decode")
    pbar = comfy.utils.ProgressBar(len(plan.tiles))
    # One partial image per rank in shared memory; the ranks sum them into the first, which
    # becomes the output: nothing image-sized travels through the pipe.
    paths = payload["partial_paths"] = shm.float32_files(
        plan.out_shape, world, what="the decoded image (one partial per GPU)")
    began = time.monotonic()
    try:
        result = pool.run(JOB, payload, timeout_s=timeout_s,
                          on_progress=lambda step, total, extra: pbar.update_absolute(step, total),
                          should_interrupt=comfy.model_management.processing_interrupted)
        output = shm.map_float32(paths[0], plan.out_shape)  # valid after the unlink below
        mark_resident(pool, "vae", recipe["fingerprint"])
    except PoolInterrupted:
        raise comfy.model_management.InterruptProcessingException()
    except WorkerFailure as exc:
        if exc.reason == "out_of_memory":
            raise with_hint(exc, "To decode with less memory a GPU: lower tile_size on Parallel VAE Decode (and "
                                 "temporal_size for video).") from exc
        if exc.reason == "timeout":
            raise with_hint(exc, f"Parallel VAE Decode waits {timeout_s:g} s for a tile; on CPU ranks lower "
                                 "tile_size so that one tile takes less.") from exc
        raise
    finally:
        for path in paths:
            Path(path).unlink(missing_ok=True)  # gone already if ComfyUI is exiting (shm.remove_own_dirs)
    phases = "; ".join(f"rank {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in p.items())
                       for r, p in enumerate(result["phases"]))
    log.info("Parallel VAE Decode: %d tiles on %d %s rank(s) in %.2f s (tiles per rank %s; %s)",
             len(plan.tiles), world, device, time.monotonic() - began, result["tiles_per_rank"], phases)
    return output


_told_adopted: set = set()


def _running_pool_world(gpus: int, device: str, world: int) -> int:
    """The ranks to decode on: those of the running pool (Context Parallel's) where it has at
    least `gpus`, or `gpus` is 0 (all): a restart for another count would cost both nodes the
    workers' start, their loaded models and compiled code on every prompt. More GPUs than the
    pool has, asked by number, restart it as asked."""
    from ...pool import current_pool

    pool = current_pool()
    if pool is None or pool.layout.device != device or pool.layout.world_size == world:
        return world
    running = pool.layout.world_size
    if gpus > 0 and running < world:
        return world
    if (world, running) not in _told_adopted:
        _told_adopted.add((world, running))
        log.info("Parallel VAE Decode: decoding on the running worker pool's %d %s ranks (Context Parallel's) "
                 "instead of restarting it for %d", running, device, world)
    return running


def parallel_decode(vae, samples: torch.Tensor, settings: TiledDecodeSettings, gpus: int = 0,
                    timeout_s: float = 600.0) -> torch.Tensor:
    """IMAGE [N, H, W, C] equal to VAEDecodeTiled with the same settings; tiles decoded on
    `gpus` ranks of the worker pool (0: all visible GPUs; 1: in this process)."""
    from .comfy_pool import pool_world

    plan = plan_decode(vae, samples, settings)
    device, world = pool_world(gpus, "Parallel VAE Decode")
    if world == 1 or vae.first_stage_model in _not_rebuildable:
        return decode_in_process(vae, samples, plan)
    world = _running_pool_world(gpus, device, world)
    from ...pool import PoolJobError

    try:
        mapped = decode_in_pool(vae, samples, plan, world, device, timeout_s)
    except PoolJobError as exc:
        if exc.error_type != "VAENotRebuildable":
            raise
        log.warning("Parallel VAE Decode: the workers cannot rebuild this VAE (%s); decoding it in this process "
                    "(from now on)", str(exc).splitlines()[0])
        _not_rebuildable.add(vae.first_stage_model)
        from .published import withdraw

        withdraw(vae.first_stage_model, "vae", "(the workers cannot rebuild it)")
        return decode_in_process(vae, samples, plan)
    # The ranks applied process_output already, each to its slice of the image.
    image = to_image(vae, mapped, processed=True)
    if image.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr():
        # a view would keep the unlinked file's pages in /dev/shm while ComfyUI caches the output
        image = image.clone()
    return image
