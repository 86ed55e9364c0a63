"""Toy jobs for the pool tests: each is `fn(ctx, payload)` run on every rank of a pool."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist


def all_reduce_ranks(ctx, payload):
    """Sum of (rank + 1) over the group, computed with a real all_reduce."""
    value = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    if ctx.world_size > 1:
        dist.all_reduce(value)
    return {"sum": value.item(), "world_size": ctx.world_size, "device": str(ctx.device),
            "pid": os.getpid()}


def gather_from_ranks(ctx, payload):
    """Rank 0 returns one value per rank: `payload` names a key of os.environ or ctx.cache."""
    source, key = payload
    value = os.environ.get(key) if source == "env" else ctx.cache.get(key)
    if ctx.world_size == 1:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def count_steps(ctx, payload):
    """Reports every step; every rank reports (only rank 0's reports may arrive)."""
    for step in range(1, payload["steps"] + 1):
        ctx.report_progress(step, payload["steps"], rank=ctx.rank)
    return "counted"


def remember(ctx, payload):
    """Caches an object on every rank, to be found by later jobs."""
    ctx.cache[payload["key"]] = {"value": payload["value"], "rank": ctx.rank, "pid": os.getpid()}
    return os.getpid()


def raise_on_rank(ctx, payload):
    """Rank `payload["rank"]` raises ValueError(payload["message"]); others wait in a collective."""
    if ctx.rank == payload["rank"]:
        raise ValueError(payload["message"])
    if ctx.world_size > 1:
        dist.barrier()
    return "unreachable when the failing rank exists"


def fail_everywhere(ctx, payload):
    """Every rank raises the same ValueError after a progress report and a collective step, as
    a model error fails all ranks alike. `payload["leave_collective"]`: rank 0 first issues an
    all_reduce no other rank joins (a collective left half-done by the failure), on the default
    group ("world") or on the ring group of a Context Parallel layout the job builds and
    caches as sampling does ("subgroup")."""
    ctx.report_progress(1, 2)
    value = torch.ones(1)
    if ctx.world_size > 1:
        dist.all_reduce(value)
        leave = payload.get("leave_collective")
        group = None
        if leave == "subgroup":
            from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
            from comfy_para_attn.attention.collectives import process_group

            cp = ctx.cache.setdefault(("cp", "fail_everywhere"),
                                      build_parallel_context(ContextParallelConfig(ring=ctx.world_size)))
            group = process_group(cp.ring_group)
        if leave and ctx.rank == 0:
            dist.all_reduce(torch.ones(1), group=group, async_op=True)
    raise ValueError(payload["message"])


def raise_out_of_memory(ctx, payload):
    raise torch.OutOfMemoryError("Tried to allocate 64.00 GiB (toy job)")


def steady_steps(ctx, payload):
    """Collective step loop: an all_reduce per step, an agreed interrupt check at each
    step boundary, and the last finished step remembered in the cache."""
    ctx.cache["last_step"] = 0
    for step in range(1, payload["steps"] + 1):
        ctx.check_interrupt()
        value = torch.ones(1, device=ctx.device)
        if ctx.world_size > 1:
            dist.all_reduce(value)
        time.sleep(payload.get("sleep_s", 0.05))
        ctx.cache["last_step"] = step
        ctx.report_progress(step, payload["steps"])
    return ctx.cache["last_step"]


def sleep_silently(ctx, payload):
    """A hung job: no progress, no heartbeat."""
    time.sleep(payload["seconds"])
    return "woke up"


def init_remember(ctx, payload):
    """An `init` function: runs on every rank at start."""
    ctx.cache["init"] = {"payload": payload, "rank": ctx.rank}


def init_fail(ctx, payload):
    def fail():
        if ctx.rank == payload["rank"]:
            raise RuntimeError(payload["message"])

    if payload.get("agreed"):  # every rank stops together: still a failed start
        ctx.run_agreed(fail)
    fail()


def load_published(ctx, payload):
    """Loads tensors published by the controller; returns them (rank 0) as CPU tensors."""
    from comfy_para_attn.pool.transfer import load_tensors

    tensors = load_tensors(payload, ctx.device)
    return {name: tensor.cpu().clone() for name, tensor in tensors.items()}


def slow_but_chatty(ctx, payload):
    """Runs longer than the caller's timeout_s but is never silent that long: odd steps
    report progress, even steps only send a heartbeat."""
    for step in range(1, payload["steps"] + 1):
        time.sleep(payload["sleep_s"])
        if step % 2:
            ctx.report_progress(step, payload["steps"])
        else:
            ctx.heartbeat()
    return payload["steps"]


def allocate(ctx, payload):
    """Allocates `payload` bytes on the rank's device (a real OOM when too many)."""
    block = torch.empty(int(payload), dtype=torch.uint8, device=ctx.device)
    return block.numel()


def _events_fd() -> int:
    """This worker's end of its event pipe (from the config on its command line)."""
    import json
    import sys

    return json.loads(sys.argv[-1])["events_fd"]


def freeze_mid_event(ctx, payload):
    """A worker that freezes halfway through writing an event: the length header of a 1 MiB
    message and its first bytes go down the event pipe, then nothing (rank 0 only)."""
    import struct

    if ctx.rank == 0:
        os.write(_events_fd(), struct.pack("!i", 1 << 20) + b"\x80" * 4096)
    time.sleep(payload["seconds"])
    return "woke up"


def die_leaving_a_child_on_the_event_pipe(ctx, payload):
    """Rank 0 starts a child that inherits its event pipe (it sleeps `seconds`), then dies;
    the controller sees the death while the pipe is still open."""
    import subprocess

    if ctx.rank == 0:
        subprocess.Popen(["sleep", str(payload["seconds"])], pass_fds=(_events_fd(),))
        os._exit(3)
    time.sleep(60)


def unpack_sent_once(ctx, envelope):
    """Unpacks a `pool.sent_once` envelope against this rank's cache; returns (rank 0) each
    tensor's sum and whether it came from the cache, plus every rank's cache size."""
    import torch.distributed as dist

    from comfy_para_attn.pool.sent_once import ReceivedTensors, unpack

    cache = ctx.cache.setdefault("sent_once", ReceivedTensors())
    before = {t.data_ptr() for t in cache.values()}
    payload = unpack(envelope, cache)
    sizes = [None] * ctx.world_size
    dist.all_gather_object(sizes, len(cache), group=ctx.host_group)
    return {name: (float(t.double().sum()), t.data_ptr() in before) for name, t in payload.items()} | {"cache sizes": sizes}


def thread_counts(ctx, payload):
    """torch's intra-op threads on this rank before, inside and after ctx.host_threads()."""
    before = torch.get_num_threads()
    with ctx.host_threads():
        inside = torch.get_num_threads()
    return {"before": before, "inside": inside, "after": torch.get_num_threads()}


def comfy_cli_setting(ctx, name):
    """A ComfyUI command-line setting as this worker has it (enums encoded as the controller
    sends them)."""
    import comfy.cli_args

    from comfy_para_attn.adapters.comfy.env import _encode_enums

    return _encode_enums(getattr(comfy.cli_args.args, name))


def log_and_print(ctx, payload):
    """A warning through logging and a line on stdout, both naming the rank and `payload`."""
    import logging

    logging.getLogger("comfy_para_attn.test").warning("logged by rank %d: %s", ctx.rank, payload)
    print(f"printed by rank {ctx.rank}: {payload}", flush=True)
    return ctx.rank


def log_while_capturing_info(ctx, payload):
    """As the sampling job does: the root level lowered to INFO for a capturing handler, an INFO
    and a WARNING line logged; returns what the capturing handler got."""
    import logging

    lines = []
    capture = logging.Handler(logging.INFO)
    capture.emit = lambda record: lines.append(record.getMessage())
    root = logging.getLogger()
    root.addHandler(capture)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        logging.getLogger("comfy_para_attn.test").info("info for the controller %s", payload)
        logging.getLogger("comfy_para_attn.test").warning("warning for the console %s", payload)
    finally:
        root.removeHandler(capture)
        root.setLevel(old)
    return lines


class AcceleratorError(RuntimeError):
    """Named like torch's sticky CUDA errors (illegal address, device-side assert)."""


def fail_agreed_step(ctx, payload):
    """An agreed setup step that raises on the ranks in `payload["ranks"]` (with
    `payload["error"]`, ValueError by default), then a collective the failure must not reach.
    The step holds a tensor, watched by a weak reference in the cache under "held"; with
    `payload["watch"]` the cyclic garbage collector is off until `held_alive`."""
    import gc
    import weakref

    def setup():
        held = torch.ones(1 << 16)
        ctx.cache["held"] = weakref.ref(held)
        if ctx.rank in payload["ranks"]:
            raise payload.get("error", ValueError)(f"setup failed on rank {ctx.rank} (toy job)")
        return ctx.rank

    if payload.get("watch"):
        gc.disable()

    ctx.run_agreed(setup)
    dist.barrier()
    return "unreachable"


def fail_in_agreed_round(ctx, payload):
    """Rounds of local work, each ended by `check_interrupt(failed=...)`: rank
    `payload["rank"]` fails in round `payload["round"]`; the others go on to the round's check."""
    for r in range(5):
        failed = None
        if ctx.rank == payload["rank"] and r == payload["round"]:
            failed = RuntimeError(f"round {r} failed (toy job)")
        ctx.check_interrupt(failed=failed)
        ctx.report_progress(r + 1, 5)
    return "unreachable"


def held_alive(ctx, payload):
    """Whether the tensor `fail_agreed_step` watched is still alive on each rank (before any
    cyclic collection); turns the garbage collector back on."""
    import gc

    alive = ctx.cache.pop("held")() is not None
    gc.enable()
    every = [None] * ctx.world_size
    dist.all_gather_object(every, alive)
    return every


def cuda_failure_in_agreed_step(ctx, payload):
    """An agreed step on this rank's GPU that holds 1 GiB and then fails for real: "oom"
    allocates far more than the GPU has, "assert" indexes out of bounds in a CUDA kernel (a
    device-side assert, which breaks the CUDA context). Returns nothing: it always fails."""
    def step():
        held = torch.empty(1 << 30, dtype=torch.uint8, device=ctx.device)
        if payload == "oom":
            torch.empty(1 << 46, dtype=torch.uint8, device=ctx.device)  # 64 TiB
        index = torch.tensor([1 << 20], device=ctx.device)
        return held[:16][index].item()

    ctx.run_agreed(step)


def cuda_memory_allocated(ctx, payload):
    """Bytes torch holds on this rank's GPU (after freeing its cache)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _started_then_sleep(started):
    started.set()
    time.sleep(60)


def terminate_a_forked_child(ctx, payload):
    """Fork a child (no exec, as multiprocessing's fork context does), SIGTERM it once it runs;
    its exit code (-15: it died of the signal) or None if it outlived `payload` seconds. (A
    signal in the microseconds between the fork and the child's at-fork hook would still reach
    the worker's handler.)"""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=_started_then_sleep, args=(started,))
    child.start()
    started.wait(30)
    child.terminate()
    child.join(payload)
    code = child.exitcode
    if code is None:
        child.kill()
        child.join()
    time.sleep(1.0)  # time for a stray wakeup byte to reach this worker's watchdog
    return code
