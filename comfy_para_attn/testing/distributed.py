"""Run a function on N real processes joined in a gloo (or NCCL) process group.

Tests use this for the unit and diffusers tiers: each rank is a spawned Python process,
the collectives are real. Results come back per rank, pickled by value, through a queue.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch.multiprocessing as mp

from ..refs import ObjectRef


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, backend, fn_ref, args, queue, one_gpu_per_rank=False):
    if one_gpu_per_rank:  # like the pool's workers; must precede CUDA's start (the NCCL group starts it)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(world_size)]
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[rank]
    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        fn = fn_ref.resolve()
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # By value: the queue would share a tensor's storage through a file this process
        # removes when it exits, sometimes before the parent has opened it.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure with its traceback to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 300.0,
              one_gpu_per_rank: bool = False) -> list:
    """Call `fn(rank, world_size, *args)` on `world_size` spawned ranks; return results by rank.

    `fn` must be importable (module-level). `one_gpu_per_rank`: rank r sees only the r-th
    visible GPU (as cuda:0), as in the pool. Raises RuntimeError with the failing rank's
    traceback if any rank fails or the group does not finish within `timeout` seconds.
    """
    if one_gpu_per_rank:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and len(visible.split(",")) < world_size:
            raise ValueError(f"{world_size} ranks need {world_size} GPUs; CUDA_VISIBLE_DEVICES={visible!r}")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    fn_ref = ObjectRef(fn)  # test modules too: ComfyUI's `tests` package may shadow ours
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, backend, fn_ref, args, queue, one_gpu_per_rank), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    except Exception as exc:  # queue.Empty: a rank hung or died without reporting
        errors.append(f"ranks did not finish within {timeout}s ({type(exc).__name__})")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
