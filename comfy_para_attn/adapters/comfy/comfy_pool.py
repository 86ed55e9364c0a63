"""Where the worker pool runs and how ComfyUI starts it: shared by Context Parallel
(pool_sampling.py) and Parallel VAE Decode (parallel_vae.py), which use the same pool."""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("comfy_para_attn")
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

ON_WINDOWS = os.name == "nt"


def pool_unsupported() -> str | None:
    """Why this machine runs no worker pool, or None. Workers inherit their pipes (`pass_fds`,
    POSIX only) and talk NCCL (CUDA) or gloo (CPU processes); ComfyUI on another device (Apple
    MPS, Intel XPU, DirectML, ...) would have its GPU idle while CPU processes sampled."""
    if ON_WINDOWS:
        return "Windows"
    try:
        import comfy.model_management

        kind = comfy.model_management.get_torch_device().type
    except ImportError:
        return None
    return None if kind in ("cuda", "cpu") else f"ComfyUI's {kind} device"


def available_device() -> tuple[str, int]:
    """("cuda", visible GPUs) unless ComfyUI runs with --cpu or there is no GPU: ("cpu", 2)."""
    try:
        import comfy.cli_args

        force_cpu = bool(comfy.cli_args.args.cpu)
    except ImportError:
        force_cpu = False
    if not force_cpu and torch.cuda.is_available():
        return "cuda", torch.cuda.device_count()
    return "cpu", 2


_told_in_process: set = set()


def pool_world(gpus: int, node: str) -> tuple[str, int]:
    """(device, ranks) for a node's `gpus` input (0: all visible); ValueError says what to set.
    Where no pool can run, 0 means this process (logged once) and more than 1 is an error."""
    unsupported = pool_unsupported()
    if unsupported:
        if gpus > 1:
            raise ValueError(f"{node}: gpus={gpus}, but {unsupported} cannot run the worker pool (it needs "
                             "Linux with CUDA GPUs, or CPU processes under --cpu). Set gpus to 0 or 1 to run "
                             "in this process.")
        if gpus <= 0 and node not in _told_in_process:
            _told_in_process.add(node)
            log.warning("%s: no worker pool on %s: gpus 0 runs in this process", node, unsupported)
        return "local", 1
    device, visible = available_device()
    world = visible if gpus <= 0 else gpus
    if device == "cuda" and world > visible:
        raise ValueError(f"gpus={world} but only {visible} GPU(s) are visible; set gpus to at most {visible}.")
    most = max(4, os.cpu_count() or 1)
    if device == "cpu" and world > most:
        # each CPU rank is a ComfyUI process holding the whole model
        raise ValueError(f"{node}: gpus={world} CPU ranks (no GPU is used, {os.cpu_count()} CPU cores); each rank "
                         f"holds the whole model in host memory. Set gpus to at most {most}, or 0 for 2.")
    return device, world


START_TIMEOUT_ENV = "COMFY_PARA_ATTN_POOL_START_TIMEOUT_S"


def comfy_pool(world: int, device: str):
    """The worker pool for `world` ranks, its workers set up with this server's ComfyUI
    settings. Context Parallel and Parallel VAE Decode share it (same arguments, same pool)."""
    import comfy.model_management

    from ...attention.config import env_int
    from ...pool import PoolInterrupted, PoolStartError, get_pool
    from . import memory
    from .env import snapshot_cli_args

    memory.install()  # from now on ComfyUI's "unload all models" reaches the workers too
    comfy_dir = os.path.dirname(os.path.dirname(os.path.abspath(comfy.model_management.__file__)))
    cli_args = snapshot_cli_args()
    cli_args["cpu"] = device == "cpu"
    start_timeout_s = env_int(START_TIMEOUT_ENV, 120, minimum=1)
    try:
        return get_pool(world, device=device, sys_path=[comfy_dir, PACK_ROOT], start_timeout_s=start_timeout_s,
                        init=("comfy_para_attn.adapters.comfy.worker_jobs:init_worker",
                              {"comfy_path": comfy_dir, "cli_args": cli_args}),
                        should_interrupt=comfy.model_management.processing_interrupted)
    except PoolInterrupted:  # Cancel while the workers started
        raise comfy.model_management.InterruptProcessingException()
    except PoolStartError as exc:
        if exc.reason == "timeout":
            raise PoolStartError(f"{exc}\nA first start on a slow disk or with many GPUs can take longer: set "
                                 f"{START_TIMEOUT_ENV} (seconds, now {start_timeout_s}) in ComfyUI's environment.",
                                 reason=exc.reason, rank=exc.rank, job=exc.job,
                                 worker_traceback=exc.worker_traceback) from exc
        raise
