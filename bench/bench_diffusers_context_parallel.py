"""Context-parallel FLUX in diffusers: 1 GPU vs 2 GPUs (ours and diffusers' own), eager and compiled.

    python bench/bench_diffusers_context_parallel.py            # 2 GPUs, FLUX.1-dev-sized, bf16
    python bench/bench_diffusers_context_parallel.py --tiny     # CPU check: tiny model, 2 gloo ranks

Spawns its own ranks (torch.multiprocessing), so one command does everything. Random
weights (FLUX.1-dev shapes: 19 double + 38 single blocks, 24 heads x 128), 1024x1024 =
4096 image + 512 text tokens, batch 1. Each row: median ms/step of `--steps` model calls
after `--warmup`; speedup is against 1 GPU in the same mode (eager or compiled). Compiled
means regional compile of the transformer blocks (what diffusers recommends). The max
relative error of each parallel output against the 1-GPU output is printed as a sanity
check (bf16: expect ~1e-2). Needs only torch, diffusers and this package.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy_para_attn.adapters.diffusers.context_parallel import (  # noqa: E402
    parallelize_transformer,
    unparallelize_transformer,
)
from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context  # noqa: E402
from comfy_para_attn.testing.diffusers_models import flux_dev_sized, flux_inputs, tiny_flux  # noqa: E402
from comfy_para_attn.testing.distributed import free_port  # noqa: E402

LAYOUTS = {"ulysses": dict(ulysses=2), "ring": dict(ring=2)}


def build_model(args, device):
    if args.tiny:
        return tiny_flux(heads=4, num_layers=2, num_single_layers=2)
    return flux_dev_sized(device=device, dtype=torch.bfloat16)


def build_inputs(args, device):
    if args.tiny:
        call = flux_inputs(height=8, width=8, tokens=16)
    else:
        side = args.resolution // 16  # VAE /8, then 2x2 patches
        call = flux_inputs(height=side, width=side, tokens=512, in_channels=64, text_dim=4096, pooled_dim=768,
                           dtype=torch.bfloat16, device=device)
    call["timestep"] = torch.full((1,), 0.5, dtype=call["hidden_states"].dtype, device=device)
    call["return_dict"] = False
    return call


def set_compiled(model, compiled: bool, args) -> None:
    """Regional compile of the repeated blocks, or back to eager."""
    torch._dynamo.reset()
    backend = "aot_eager" if args.tiny else "inductor"
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        if compiled:
            block.compile(backend=backend, fullgraph=args.fullgraph, dynamic=False)
        else:
            block._compiled_call_impl = None


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, call, args, device, group_barrier=True):
    """Median ms of `args.steps` calls after `args.warmup`; returns (ms, last output)."""
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            if group_barrier:
                dist.barrier()
            synchronize(device)
            start = time.perf_counter()
            out = model(**call)[0]
            synchronize(device)
            if i >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def relative_error(out, ref) -> float:
    if out is None or ref is None:
        return float("nan")
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = not args.tiny
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    # Our pool's CUDA workers run with one host thread (pool.launch.worker_env); 0 keeps
    # torch's default (one per core in every rank). CPU ranks share the cores.
    threads = args.host_threads if use_cuda else max(1, (os.cpu_count() or 2) // world)
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                            device_id=device if use_cuda else None)
    rows = []  # (mode, name, ms, relative error vs 1 GPU)
    modes = ([] if args.skip_eager else ["eager"]) + ([] if args.no_compile else ["compiled"])
    # Every rank builds the same groups in the same order.
    contexts = {name: build_parallel_context(ContextParallelConfig(**kw), num_heads=24 if not args.tiny else 4)
                for name, kw in LAYOUTS.items()}
    model = build_model(args, device)
    call = build_inputs(args, device)
    reference = {}

    for mode in modes:
        set_compiled(model, mode == "compiled", args)
        if rank == 0:  # 1 GPU: rank 0 alone, the others wait
            ms, reference[mode] = time_steps(model, call, args, device, group_barrier=False)
            rows.append((mode, "1 GPU", ms, 0.0))
        dist.barrier()
        for name, cp in contexts.items():
            parallelize_transformer(model, cp)
            set_compiled(model, mode == "compiled", args)
            ms, out = time_steps(model, call, args, device)
            rows.append((mode, f"ours {name} 2", ms, relative_error(out, reference.get(mode))))
            unparallelize_transformer(model)
        set_compiled(model, False, args)

    # diffusers' own context parallelism cannot be undone: a fresh model per layout.
    del model
    gc.collect()
    if use_cuda:
        torch.cuda.empty_cache()
    for name in [] if args.ours_only else LAYOUTS:
        degree = {"ulysses": dict(ulysses_degree=2), "ring": dict(ring_degree=2)}[name]
        try:
            from diffusers import ContextParallelConfig as DiffusersCPConfig

            model = build_model(args, device)
            if name == "ring" and use_cuda:
                # diffusers' ring needs a kernel that returns the lse; NATIVE does not.
                model.set_attention_backend("_native_cudnn")
            model.enable_parallelism(config=DiffusersCPConfig(**degree))
        except Exception as exc:  # e.g. diffusers builds a device mesh only on accelerators
            for mode in modes:
                rows.append((mode, f"diffusers {name} 2", float("nan"), f"n/a: {type(exc).__name__}: {exc}"[:90]))
            continue
        for mode in modes:
            try:
                set_compiled(model, mode == "compiled", args)
                ms, out = time_steps(model, call, args, device)
                rows.append((mode, f"diffusers {name} 2", ms, relative_error(out, reference.get(mode))))
            except Exception as exc:  # report, keep the rows measured so far
                rows.append((mode, f"diffusers {name} 2", float("nan"), f"n/a: {type(exc).__name__}: {exc}"[:90]))
        del model
        gc.collect()
        if use_cuda:
            torch.cuda.empty_cache()

    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def describe(args) -> list[str]:
    import diffusers

    from comfy_para_attn.attention import local

    lines = [f"torch {torch.__version__}, diffusers {diffusers.__version__}"]
    if args.tiny:
        lines.append("device: CPU (tiny model, 2 gloo ranks; timings are a smoke test only)")
        probe = torch.zeros(1, 1, 1, 8)
    else:
        lines.append(f"device: 2 x {torch.cuda.get_device_name(0)}, host threads per rank: "
                     f"{args.host_threads or 'torch default'}")
        probe = torch.zeros(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16)
    ours = local.get_backend() if local.get_backend() != "auto" else local._auto(probe, None)
    lines.append(f"attention: 1 GPU and diffusers CP use diffusers' NATIVE backend (torch SDPA); "
                 f"ours uses comfy_para_attn local kernel '{ours}'")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU with 2 gloo ranks")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--skip-eager", action="store_true", help="compiled rows only")
    parser.add_argument("--ours-only", action="store_true", help="no rows for diffusers' own context parallelism")
    parser.add_argument("--host-threads", type=int, default=1,
                        help="torch intra-op threads per CUDA rank (0: torch's default; runs before "
                             "session 12 used the default)")
    parser.add_argument("--fullgraph", action="store_true", help="compile blocks with fullgraph=True")
    args = parser.parse_args()
    world = 2
    if not args.tiny and torch.cuda.device_count() < world:
        sys.exit(f"needs {world} GPUs, found {torch.cuda.device_count()}; use --tiny for a CPU check")

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(worker, args=(world, free_port(), args, results), nprocs=world, join=True,
                       start_method="spawn")
    rows = results.get()

    for line in describe(args):
        print(line)
    tokens = "tiny" if args.tiny else f"{(args.resolution // 16) ** 2} image + 512 text tokens"
    print(f"FluxTransformer2DModel, {tokens}, median of {args.steps} steps after {args.warmup} warm-up\n")
    print(f"{'mode':<9} {'setup':<20} {'ms/step':>9} {'speedup':>8}  max rel err vs 1 GPU")
    baseline = {mode: ms for mode, name, ms, _ in rows if name == "1 GPU"}
    for mode, name, ms, err in sorted(rows, key=lambda row: row[0] != "eager"):  # stable: eager rows first
        speedup = baseline[mode] / ms if ms == ms and ms > 0 else float("nan")
        err_text = err if isinstance(err, str) else f"{err:.2e}"
        print(f"{mode:<9} {name:<20} {ms:>9.1f} {speedup:>7.2f}x  {err_text}")


if __name__ == "__main__":
    main()
