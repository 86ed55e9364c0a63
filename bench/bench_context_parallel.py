"""Context Parallel in ComfyUI: in-process 1 GPU vs the worker pool on N GPUs, same run.

    python bench/bench_context_parallel.py --comfyui PATH [--family flux|hunyuan_video]
        [--steps 28] [--gpus 2] [--compile] [--tiny] [--controlnet]

Random weights at the real model size (FLUX.1-dev: 12B, 1024x1024 = 4096 image + 512 text
tokens; HunyuanVideo: 13B, 544x960x33 frames = 18,360 image tokens), bf16, sampled through
`comfy.sample.sample` exactly as a KSampler does. Prints the device, torch version,
attention backend and a table: ms/step, speedup vs 1 GPU in the same mode, max abs
difference of the final latent vs 1 GPU, plus pool start time, model transfer and
per-prompt overhead. `--tiny` runs a tiny model on 2 CPU ranks (smoke test). With
`PARA_ATTN_PROFILE=N` set, each layout also samples an N-step prompt that the workers profile
(their summaries print with the rank logs). `--worker-threads default,1` compares the workers'
intra-op thread counts, each with its own pool, in one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(args):
    from comfy_para_attn.testing import comfy_models

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config, latent, tokens = comfy_models.benchmark_size(args.family, args.tiny)
    patcher = comfy_models.build(args.family, dtype=dtype, device=device, **config)
    # On the CPU by default, where ComfyUI's text encoders leave the conditioning (the pool
    # then sends it once, `pool.sent_once`; in-process ComfyUI copies it to the GPU per call).
    conds_device = "cpu" if args.tiny else args.conds_device
    positive = comfy_models.conditioning(patcher, tokens=tokens, seed=1, device=conds_device)
    negative = comfy_models.conditioning(patcher, tokens=tokens, seed=2, device=conds_device)
    shape = comfy_models.latent_shape(args.family, **latent)
    image = torch.zeros(shape)  # text-to-image: empty latent, as EmptyLatentImage gives
    if args.controlnet:
        positive, negative = with_controlnet(args, config, shape, positive, negative)
    return patcher, positive, negative, image


def with_controlnet(args, config, shape, positive, negative):
    """The conds with an XLabs-style FLUX ControlNet (its own hint encoder; XLabs' FLUX
    ControlNets have 2 double blocks) at the model's width, random weights, on a random hint."""
    from comfy_para_attn.testing import comfy_models

    if args.family != "flux":
        raise SystemExit("--controlnet: FLUX only")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    control = comfy_models.flux_controlnet(seed=6, dtype=dtype, **dict(config, depth=2, depth_single_blocks=0))
    hint = torch.rand(1, 3, shape[-2] * 8, shape[-1] * 8, generator=torch.Generator().manual_seed(5))
    control = control.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    return [[[t, {**extra, "control": control, "control_apply_to_uncond": True}] for t, extra in conds]
            for conds in (positive, negative)]


def run(model, positive, negative, image, steps, cfg):
    from comfy_para_attn.testing import comfy_models

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    out = comfy_models.sample(model, positive, negative, image, steps=steps, cfg=cfg, seed=7)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out.float().cpu(), time.perf_counter() - began


_ORIGINAL_OMP = os.environ.get("OMP_NUM_THREADS")


def with_worker_threads(threads: str) -> None:
    """OMP_NUM_THREADS for pools started from now on (workers inherit this process's
    environment; the pool sets cores / ranks only where it is unset)."""
    value = _ORIGINAL_OMP if threads == "default" else threads
    if value is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = value


def one_step(model, positive, negative, image, cfg, repeats: int = 3) -> float:
    """Seconds of a 1-step prompt, the median of `repeats` (it is what the per-prompt overhead
    is computed from, and single prompts vary by tens of ms)."""
    return statistics.median(run(model, positive, negative, image, 1, cfg)[1] for _ in range(repeats))


def steady_step(seconds: float, one_step_seconds: float, steps: int) -> float:
    """Seconds per step of a `steps`-step prompt (which took `seconds`) without the prompt's
    fixed cost: what it took beyond a 1-step prompt, per extra step."""
    if steps < 2:
        return float("nan")
    return (seconds - one_step_seconds) / (steps - 1)


def prompt_overhead(seconds: float, one_step_seconds: float, steps: int) -> float:
    """A prompt's time beyond its steps: a 1-step prompt's time minus the steady step."""
    return one_step_seconds - steady_step(seconds, one_step_seconds, steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--family", default="flux", choices=["flux", "hunyuan_video"])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="also compare with our Compile node applied")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--layouts", default="ulysses,ring")
    parser.add_argument("--skip-eager", action="store_true")
    parser.add_argument("--worker-threads", default="default",
                        help="comma-separated OMP_NUM_THREADS for the workers, each with a pool of its own in "
                             "this run ('default': the pool's own choice, one thread a CUDA rank since session 12; "
                             "before, cores / ranks), e.g. default,16")
    parser.add_argument("--conds-device", default="cpu", choices=["cpu", "cuda"],
                        help="where the conditioning lives (cpu: as CLIPTextEncode leaves it; runs before "
                             "session 11 used cuda)")
    parser.add_argument("--half-tokens", action="store_true", help="also time 1 GPU on half the tokens")
    parser.add_argument("--controlnet", action="store_true",
                        help="FLUX: sample with an XLabs-style ControlNet (2 double blocks, random weights)")
    parser.add_argument("--ours-baseline", action="store_true",
                        help="also time 1 GPU with its attention on our local kernel (the workers' choice, e.g. "
                             "cuDNN), not only with ComfyUI's own (torch SDPA's default choice)")
    args = parser.parse_args()
    # Workers log at INFO with timestamps (model load, each rank's phase timings), so a slow or
    # stuck first prompt shows where it is.
    os.environ.setdefault("COMFY_PARA_ATTN_WORKER_LOG_LEVEL", "INFO")
    import logging

    ours = logging.getLogger("comfy_para_attn")  # weights written to shm, job timings
    ours.setLevel(logging.INFO)
    ours.addHandler(logging.StreamHandler(sys.stdout))
    ours.propagate = False
    began_all = time.perf_counter()

    def stamp(what):
        print(f"[{time.perf_counter() - began_all:7.1f} s] {what}", flush=True)

    from comfy_para_attn.adapters.comfy.env import make_importable

    make_importable(args.comfyui, cpu=args.tiny)
    import comfy.model_management

    from comfy_para_attn.adapters.comfy.pool_sampling import apply_context_parallel, make_settings
    from comfy_para_attn.attention.local import _auto
    from comfy_para_attn.pool import registry

    patcher, positive, negative, image = build(args)
    q = torch.empty(1, 1, 1, 8, dtype=torch.bfloat16, device="cpu" if args.tiny else "cuda")
    device_name = "cpu" if args.tiny else torch.cuda.get_device_name(0)
    print(f"device: {device_name} x{torch.cuda.device_count() if not args.tiny else 0} | torch {torch.__version__} | "
          f"attention backend: {_auto(q, None)} | family {args.family} | steps {args.steps} | cfg {args.cfg} | "
          f"conds on {'cpu' if args.tiny else args.conds_device} | controlnet {args.controlnet}")

    modes = [] if args.skip_eager else [("eager", patcher)]
    if args.compile:
        from comfy_para_attn.adapters.comfy.features import apply as apply_feature
        from comfy_para_attn.adapters.comfy.compile import CompileSettings

        modes.append(("compiled", apply_feature("compile", patcher, CompileSettings())))
    rows, extra = [], []

    class Rows(list):  # print each row as soon as it is measured (a timeout keeps what ran)
        def append(self, row):
            super().append(row)
            print(f"row: {row[0]}: {row[1]:.1f} ms/step, {row[2]:.2f}x, diff {row[3]:.3g}", flush=True)

    rows = Rows()
    for mode, model in modes:
        run(model, positive, negative, image, 2, args.cfg)  # warm-up (and compile)
        ref, seconds = run(model, positive, negative, image, args.steps, args.cfg)
        base = seconds / args.steps
        rows.append((f"1 GPU in-process ({mode})", base * 1e3, 1.0, 0.0))
        in_process_overhead = prompt_overhead(seconds, one_step(model, positive, negative, image, args.cfg), args.steps)
        extra.append(f"{mode}: in-process 1 GPU per-prompt overhead {in_process_overhead * 1e3:.0f} ms "
                     "(ComfyUI's own sampler setup; the pool's rows include it too)")
        ours_base = None
        if args.ours_baseline:  # the same attention kernel as the workers, on one GPU
            from comfy_para_attn.adapters.comfy.attention_backend import apply_attention_backend

            ours = apply_attention_backend(model, "auto")
            run(ours, positive, negative, image, 2, args.cfg)
            ours_out, seconds = run(ours, positive, negative, image, args.steps, args.cfg)
            ours_base = seconds / args.steps
            rows.append((f"1 GPU in-process, attention on our kernel ({mode})", ours_base * 1e3, base / ours_base,
                         (ours_out - ref).abs().max().item()))
        if args.half_tokens:  # the compute floor of 2 ranks: each holds half the tokens
            half = image[..., : image.shape[-1] // 2]
            run(model, positive, negative, half, 2, args.cfg)
            _, seconds = run(model, positive, negative, half, args.steps, args.cfg)
            rows.append((f"1 GPU in-process, half the image tokens ({mode})", seconds / args.steps * 1e3,
                         base / (seconds / args.steps), float("nan")))
        layouts = [("ulysses", dict(ulysses=args.gpus, ring=1)), ("ring", dict(ulysses=1, ring=args.gpus))]
        layouts = [(name, kw) for name, kw in layouts if name in args.layouts.split(",")]
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        thread_settings = args.worker_threads.split(",")
        for (layout_name, layout), threads in [(lay, t) for lay in layouts for t in thread_settings]:
            threads_label = ""
            if len(thread_settings) > 1:  # each setting gets a pool started with it
                registry.shutdown_pool()
                with_worker_threads(threads)
                threads_label = f", worker threads {threads}"
            name = layout_name + threads_label
            settings = make_settings(model, args.gpus, layout["ulysses"], layout["ring"], False, 900.0, auto=False)
            cp_model = apply_context_parallel(model, settings)
            stamp(f"{mode}/{name}: first prompt (pool start, transfer, load{', compile' if mode == 'compiled' else ''})")
            began = time.perf_counter()
            run(cp_model, positive, negative, image, 2, args.cfg)  # first prompt: pool start, transfer, load
            first = time.perf_counter() - began
            from comfy_para_attn.adapters.comfy.pool_sampling import last_run_logs

            for lines in last_run_logs:
                stamp("; ".join(line for line in lines if line.startswith("Context Parallel rank")))
            stamp(f"{mode}/{name}: timed prompt")
            out, seconds = run(cp_model, positive, negative, image, args.steps, args.cfg)
            one = one_step(cp_model, positive, negative, image, args.cfg)
            if os.environ.get("PARA_ATTN_PROFILE", "").isdigit():  # the workers profile a prompt of that many steps
                run(cp_model, positive, negative, image, int(os.environ["PARA_ATTN_PROFILE"]), args.cfg)
            per_step = seconds / args.steps  # the whole prompt: what a user waits for
            steady = steady_step(seconds, one, args.steps)
            overhead = prompt_overhead(seconds, one, args.steps)
            err = (out - ref).abs().max().item()
            rows.append((f"{args.gpus} GPUs {layout_name} x{args.gpus}{threads_label} ({mode})", per_step * 1e3,
                         base / per_step, err))
            pool = registry._current
            extra.append(f"{mode}/{name}: first prompt (2 steps incl. pool start/transfer/load) {first:.1f} s; "
                         f"pool start {pool.start_seconds:.1f} s; per-prompt overhead {overhead * 1e3:.0f} ms "
                         f"({(overhead - in_process_overhead) * 1e3:.0f} ms over in-process); "
                         f"{steady * 1e3:.1f} ms/step without it ({base / steady:.2f}x)"
                         + (f"; against 1 GPU with our attention kernel {ours_base / per_step:.2f}x, "
                            f"{ours_base / steady:.2f}x without the overhead" if ours_base else ""))
    registry.shutdown_pool()
    print("\n".join(extra))
    print(f"\n| configuration | ms/step | speedup vs 1 GPU | max abs diff vs 1 GPU |\n|---|---|---|---|")
    for name, ms, speedup, err in rows:
        print(f"| {name} | {ms:.1f} | {speedup:.2f}x | {err:.3g} |")


if __name__ == "__main__":
    main()
