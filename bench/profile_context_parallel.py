"""Where does a context-parallel ComfyUI step spend its time? Profile one rank.

    python bench/profile_context_parallel.py --comfyui PATH [--gpus 2] [--steps 8]
        [--layouts ulysses,ring] [--compile] [--fp8] [--sync-debug] [--tiny]
        [--attention-backend auto|sdpa-cudnn|sdpa-flash|...] [--one-gpu-backends sdpa,triton-fp8]
        [--family hunyuan_video --frames 33]

Spawns the ranks directly (no pool: this isolates the per-step cost from pool overhead),
each builds the same seeded full-size ComfyUI model (random weights, bf16; FLUX.1-dev at
1024x1024, or `--family hunyuan_video`: 13B at 544x960 x 33 frames, `--frames` latent frames:
33 is 129 video frames, 67,320 tokens) and samples with `install_context_parallel`. A 1-GPU run of
the same code without context parallelism is the baseline; `--one-gpu-backends` adds 1-GPU rows
with the Attention Backend node's choice (ComfyUI's own attention in the baseline). For each configuration it prints ms/step
(`comfy.sample.sample`, median-free: total / steps after a warm-up prompt), then a
profile of one step on rank 0: GPU busy time (sum of kernel time), NCCL kernel time,
attention kernel time, and the top kernels, so CPU-bound steps (wall >> GPU busy) and
exposed communication show up. `--tiny`: a tiny model on 2 CPU gloo ranks (smoke test).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy_para_attn.profiling import host_syncs, idle_gaps, kernel_summary  # noqa: E402
from comfy_para_attn.testing.distributed import run_ranks  # noqa: E402


def profile_rank(rank, world_size, comfy_path, ulysses, ring, steps, compile_blocks, tiny, fp8=False, chunks=None,
                 family="flux", sync_debug=False, attention_backend="auto", compile_mode="default", top_n=12,
                 profile_steps=2, cuda_graph="off", frames=None, one_gpu_backend=None):
    device = "cpu" if tiny else "cuda"
    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(comfy_path, cpu=tiny)
    from comfy_para_attn.adapters.comfy.context_parallel import install_context_parallel
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
    from comfy_para_attn.attention import parallel
    from comfy_para_attn.testing import comfy_models

    if chunks is not None and ring > 1:  # "ring:C": gather the keys in C head groups; "ring:0": overlap
        from comfy_para_attn.attention import ring as ring_module

        ring_module.GATHER_MAX_TOKENS = 1 << 30 if chunks else 0
        ring_module.FETCH_CHUNKS = max(chunks, 1)
    elif chunks is not None:
        parallel.ULYSSES_CHUNKS = chunks
    from comfy_para_attn.attention.local import set_backend

    set_backend(attention_backend)  # ComfyUI's own attention stays as it is (1 GPU baseline)
    dtype = torch.float32 if tiny else torch.bfloat16
    config, latent_size, tokens = comfy_models.benchmark_size(family, tiny)
    if frames:
        latent_size = dict(latent_size, frames=frames)
    patcher = comfy_models.build(family, dtype=dtype, device=device, seed=0, **config)
    positive = comfy_models.conditioning(patcher, tokens=tokens, seed=1, device=device)
    latent = torch.zeros(comfy_models.latent_shape(family, **latent_size))
    model = patcher
    if fp8:
        from comfy_para_attn.adapters.comfy.fp8 import apply_fp8
        from comfy_para_attn.quant import FP8Settings

        model = apply_fp8(model, FP8Settings())
    if compile_blocks:
        from comfy_para_attn.adapters.comfy.compile import apply_compile
        from comfy_para_attn.compile import CompileSettings

        model = apply_compile(model, CompileSettings(backend="eager" if tiny else "inductor", mode=compile_mode,
                                                       cuda_graph=cuda_graph))
    if one_gpu_backend:
        from comfy_para_attn.adapters.comfy.attention_backend import apply_attention_backend

        model = apply_attention_backend(model, one_gpu_backend)
    if world_size > 1:
        model = install_context_parallel(model, build_parallel_context(ContextParallelConfig(ulysses=ulysses, ring=ring)))

    def sample(n):
        if not tiny:
            torch.cuda.synchronize()
        began = time.perf_counter()
        out = comfy_models.sample(model, positive, [], latent, steps=n, cfg=1.0, seed=7)
        if not tiny:
            torch.cuda.synchronize()
        return out, time.perf_counter() - began

    began = time.perf_counter()
    sample(2)
    warmup = time.perf_counter() - began
    syncs = host_syncs(lambda: sample(1)) if sync_debug and not tiny else []
    out, seconds = sample(steps)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([] if tiny else [torch.profiler.ProfilerActivity.CUDA])
    with torch.profiler.profile(activities=activities) as prof:
        sample(profile_steps)
    from torch._dynamo.utils import counters

    summary = kernel_summary(prof, profile_steps, top_n)
    gaps = [] if tiny else idle_gaps(prof, profile_steps)
    dynamo = {"graphs": counters["stats"].get("unique_graphs", 0),
              "graph_breaks": sum(counters["graph_break"].values())}
    result = {"ms_per_step": seconds / steps * 1e3, "gpu_busy": summary["gpu_busy"], "nccl": summary["nccl"],
              "syncs": syncs, "gaps": gaps, **dynamo}
    if rank != 0:
        return result
    # The latent goes back as numpy (by value): a shared-memory tensor dies with the rank.
    return {**result, **summary, "warmup_s": warmup, "out": out.float().cpu().numpy()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--family", default="flux", choices=["flux", "hunyuan_video"])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layouts", default="ulysses,ring", help="ulysses, ring; 'ulysses:C' pipelines C head chunks; 'ring:C' gathers the keys "
                        "in C head groups at any length, 'ring:0' overlaps")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--cuda-graph", default="off", help="Compile Model's cuda_graph: off or 'model call'")
    parser.add_argument("--fp8", action="store_true", help="FP8 Quantize (row-wise dynamic) first")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sync-debug", action="store_true", help="list where one step makes the host wait for the GPU")
    parser.add_argument("--attention-backend", default="auto",
                        help="our local kernel: auto, sdpa, sdpa-cudnn, sdpa-flash, sdpa-efficient, triton")
    parser.add_argument("--one-gpu-backends", default="",
                        help="extra 1-GPU rows, one per backend of the Attention Backend node (sdpa, triton, triton-fp8)")
    parser.add_argument("--frames", type=int, default=0, help="hunyuan_video latent frames (default 9: 33 video frames)")
    parser.add_argument("--profile-steps", type=int, default=2,
                        help="steps of the profiled prompt (its per-prompt work is spread over them)")
    parser.add_argument("--top", type=int, default=12, help="how many of the top GPU kernels to list")
    parser.add_argument("--skip-baseline", action="store_true", help="no 1-GPU run (ratios then refer to the first row)")
    args = parser.parse_args()
    backend = "gloo" if args.tiny else "nccl"
    print(f"device: {'cpu' if args.tiny else torch.cuda.get_device_name(0)} | torch {torch.__version__} | "
          f"{args.family} | compile {args.compile} | fp8 {args.fp8} | attention {args.attention_backend} | steps {args.steps}", flush=True)
    configs = [] if args.skip_baseline else [("1 GPU", 1, 1, 1, None, None)]
    configs += [(f"1 GPU, attention {name}", 1, 1, 1, None, name) for name in filter(None, args.one_gpu_backends.split(","))]
    layouts = {"ulysses": (args.gpus, 1), "ring": (1, args.gpus)}
    for spec in filter(None, args.layouts.split(",")):  # e.g. "ulysses:1" = ulysses, 1 head chunk
        name, _, chunks = spec.partition(":")
        if name == "ring" and chunks and args.gpus != 2:
            raise SystemExit(f"{spec}: the gather (and its head groups) is for a ring of two; use --gpus 2")
        configs.append((f"{spec} x{args.gpus}", args.gpus, *layouts[name], int(chunks) if chunks else None, None))
    rows, base, ref = [], None, None
    for name, world, ulysses, ring, chunks, one_gpu_backend in configs:
        results = run_ranks(profile_rank, world, args.comfyui, ulysses, ring, args.steps, args.compile, args.tiny,
                            args.fp8, chunks, args.family, args.sync_debug, args.attention_backend, args.compile_mode, args.top, args.profile_steps, args.cuda_graph,
                            args.frames, one_gpu_backend,
                            backend=backend, timeout=900,
                            one_gpu_per_rank=not args.tiny)  # like the pool
        result = results[0]
        base = base or result["ms_per_step"]
        result["out"] = torch.from_numpy(result["out"])
        ref = result["out"] if ref is None else ref
        err = (result["out"] - ref).abs().max().item()
        rows.append((name, result, base / result["ms_per_step"], err))
        print(f"\n## {name}: {result['ms_per_step']:.1f} ms/step ({base / result['ms_per_step']:.2f}x), warm-up "
              f"{result['warmup_s']:.1f} s, GPU busy {result['gpu_busy']:.1f} ms/step, NCCL {result['nccl']:.1f}, "
              f"attention {result['attention']:.1f}, max diff {err:.3g}", flush=True)
        for r, other in enumerate(results):
            print(f"  rank {r}: {other['ms_per_step']:.1f} ms/step, GPU busy {other['gpu_busy']:.1f}, NCCL "
                  f"{other['nccl']:.1f}, dynamo graphs {other['graphs']}, graph breaks {other['graph_breaks']}")
        for r, other in enumerate(results):
            for site, count in other["syncs"]:
                print(f"  rank {r} host sync x{count} per step at {site}")
            for name, ms, count in other["gaps"]:
                print(f"  rank {r} GPU idle {ms:6.2f} ms/step in {count} gaps after {name}")
        print("  top GPU kernels (ms/step, calls/step):")
        for key, ms, count in result["top"]:
            print(f"  {ms:7.2f} ms  x{count:<4d} {key}")
        print("  top CPU ops by self time:")
        for key, ms, count in result["cpu_top"]:
            print(f"  {ms:7.2f} ms  x{count:<4d} {key}")
    print("\n| config | ms/step | speedup | GPU busy | NCCL | attention | warm-up s |\n|---|---|---|---|---|---|---|")
    for name, r, speedup, _ in rows:
        print(f"| {name} | {r['ms_per_step']:.1f} | {speedup:.2f}x | {r['gpu_busy']:.1f} | {r['nccl']:.1f} | "
              f"{r['attention']:.1f} | {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()
