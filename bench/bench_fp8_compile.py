"""FP8 + regional compile benchmark on a ComfyUI Flux model with random weights.

    python bench/bench_fp8_compile.py --device cuda            # FLUX.1-dev size, 1024x1024, 28 steps
    python bench/bench_fp8_compile.py --tiny                   # CPU smoke test of this script

Every configuration runs in its own subprocess with a fresh inductor cache (honest cold
warm-up, separate peak memory), sampling through ComfyUI's `comfy.sample.sample` (euler,
cfg 1: FLUX.1-dev is guidance-distilled, one model call per step):

  comfy_bf16            ComfyUI bf16 eager (the baseline every ratio refers to)
  comfy_torch_compile   ComfyUI's TorchCompileModel (whole diffusion model, inductor)
  ours_regional_bf16    Compile Model, regional, bf16
  ours_fp8_regional     FP8 Quantize (dynamic, row-wise) + Compile Model, regional
  comfy_fp8_fast        ComfyUI's UNETLoader weight_dtype fp8_e4m3fn_fast (fp8 weights, _scaled_mm)
  extra (--configs):    ours_fp8_eager, ours_fp8_regional_tensorwise, ours_fp8_regional_autotune
                        (max-autotune-no-cudagraphs), ours_fp8_regional_cudagraphs (max-autotune),
                        ours_fp8_regional_graphs (reduce-overhead); ..._unfused_norm / _rope: the
                        same without the LayerNorm fold (PARA_ATTN_FP8_FUSED_NORM=0) or the q/k
                        RMSNorm + rotary fold (PARA_ATTN_FUSED_ROPE=0); ours_fp8_regional_int8_modulation:
                        the modulation layers with int8 weights (FP8 Quantize's modulation="int8");
                        ..._call_graph: Compile Model's cuda_graph "model call" (each model call
                        replayed as one CUDA graph); ..._unpaired_rope: q and k rotated by two
                        kernel calls (PARA_ATTN_ROPE_PAIRS=0); ..._per_step_modulation: Compile Model's
                        modulation "per step" (the default "precomputed" computes a run's modulation
                        rows in one pass over those layers at its first step); ..._multi_kernel /
                        ..._persistent: inductor's multi-kernel reductions (PARA_ATTN_MULTI_KERNEL=1:
                        the faster variant picked at the first call; 2: always the single-pass one)
  fp8 checkpoints:      comfy_fp8_scaled: ComfyUI's own path for an fp8_scaled file of the same
                        weights (its scaled fp8 ops; fp8 matmuls with a unit input scale where
                        the GPU has them, as for files whose marker allows it);
                        ours_fp8_regional_call_graph_from_scaled: FP8 Quantize + Compile Model
                        (call graph) on that file (its stored fp8 weights taken as they are)

Warm-up = wall time of the first sampling run (model load to the GPU, fp8 quantization,
compilation) minus one steady run; the table splits out dynamo + inductor compile time and the
time FP8 Quantize spent quantizing at load (the rest is mostly moving the weights to the GPU).
Needs torch (+triton), torchao and a ComfyUI source tree (COMFYUI_PATH or --comfyui). Random
weights: speed and memory only, not image quality.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIGS = ("comfy_bf16", "comfy_torch_compile", "ours_regional_bf16", "ours_fp8_regional", "comfy_fp8_fast")
EXTRA_CONFIGS = ("ours_fp8_eager", "ours_fp8_regional_tensorwise", "ours_fp8_regional_autotune",
                 "ours_fp8_regional_cudagraphs", "ours_fp8_regional_graphs", "ours_fp8_regional_unfused_norm",
                 "ours_fp8_regional_graphs_unfused_norm", "ours_fp8_regional_unfused_rope", "ours_regional_bf16_unfused_rope",
                 "ours_fp8_regional_int8_modulation", "ours_fp8_regional_call_graph",
                 "ours_fp8_regional_call_graph_int8_modulation", "ours_regional_bf16_call_graph",
                 "ours_fp8_regional_call_graph_unpaired_rope", "ours_fp8_regional_per_step_modulation",
                 "ours_fp8_regional_call_graph_per_step_modulation", "ours_fp8_regional_call_graph_torchao_proj",
                 "ours_fp8_regional_call_graph_heads_major_rope", "ours_fp8_regional_call_graph_multi_kernel",
                 "ours_fp8_regional_static_shapes", "ours_fp8_regional_call_graph_static_shapes",
                 "ours_fp8_regional_call_graph_persistent", "comfy_fp8_scaled",
                 "ours_fp8_regional_call_graph_from_scaled")
UNFUSED_NORM = {"PARA_ATTN_FP8_FUSED_NORM": "0"}  # the LayerNorm fold off, for comparisons
UNFUSED_ROPE = {"PARA_ATTN_FUSED_ROPE": "0"}  # the q/k RMSNorm + rotary fold off
UNPAIRED_ROPE = {"PARA_ATTN_ROPE_PAIRS": "0"}  # q and k rotated by two calls, not one
TORCHAO_PROJ = {"PARA_ATTN_FP8_OWN_QUANT": "0"}  # attention output projections quantized by torchao's code
HEADS_MAJOR_ROPE = {"PARA_ATTN_ROPE_SEQ_MAJOR": "0"}  # q, k written [B, H, S, D]: attention's output copied
MULTI_KERNEL = {"PARA_ATTN_MULTI_KERNEL": "1"}  # inductor's multi-kernel reductions, picked at the first call
PERSISTENT = {"PARA_ATTN_MULTI_KERNEL": "2"}  # the same, always the single-pass (persistent) variant
ENV_OF_CONFIG = {"ours_fp8_regional_unfused_norm": UNFUSED_NORM, "ours_fp8_regional_graphs_unfused_norm": UNFUSED_NORM,
                 "ours_fp8_regional_unfused_rope": UNFUSED_ROPE, "ours_regional_bf16_unfused_rope": UNFUSED_ROPE,
                 "ours_fp8_regional_call_graph_unpaired_rope": UNPAIRED_ROPE,
                 "ours_fp8_regional_call_graph_torchao_proj": TORCHAO_PROJ,
                 "ours_fp8_regional_call_graph_heads_major_rope": HEADS_MAJOR_ROPE,
                 "ours_fp8_regional_call_graph_multi_kernel": MULTI_KERNEL,
                 "ours_fp8_regional_call_graph_persistent": PERSISTENT}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _configure(name, model, device, cm):
    """The ModelPatcher for configuration `name`, built from the bf16 `model`."""
    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.fp8 import apply_fp8
    from comfy_para_attn.compile import CompileSettings
    from comfy_para_attn.quant import FP8Settings

    if name == "comfy_bf16":
        return model
    if name == "comfy_torch_compile":
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        m = model.clone()
        set_torch_compile_wrapper(model=m, backend="inductor")  # exactly what TorchCompileModel does
        return m
    if name == "comfy_fp8_scaled" or name.endswith("_from_scaled"):
        model = _fp8_scaled_twin(model, device)
        if name == "comfy_fp8_scaled":
            return model
        name = name.removesuffix("_from_scaled")
    if name == "comfy_fp8_fast":  # what UNETLoader's fp8_e4m3fn_fast does after model detection
        import copy

        import comfy.model_patcher

        sd = model.model.diffusion_model.state_dict()
        config = copy.deepcopy(model.model.model_config)
        config.set_inference_dtype(torch.float8_e4m3fn, torch.bfloat16)
        config.optimizations["fp8"] = True
        fp8_model = config.get_model({}, "")
        fp8_model.load_model_weights(sd, "")
        return comfy.model_patcher.ModelPatcher(fp8_model, load_device=device, offload_device=model.offload_device)
    granularity = "tensor-wise" if name.endswith("tensorwise") else "row-wise"
    m = model
    if "fp8" in name:
        modulation = "int8" if "int8_modulation" in name else "original"
        m = apply_fp8(m, FP8Settings(granularity=granularity, modulation=modulation))
    if "regional" in name:
        modes = {"_autotune": "max-autotune-no-cudagraphs", "_cudagraphs": "max-autotune", "_graphs": "reduce-overhead"}
        mode = next((m for key, m in modes.items() if key in name), "default")
        m = apply_compile(m, CompileSettings(mode=mode, cuda_graph="model call" if "call_graph" in name else "off",
                                             modulation="per step" if "per_step_modulation" in name else "precomputed",
                                             dynamic="static_shapes" not in name))
    return m


def _fp8_scaled_twin(model, device):
    """The bf16 `model` as ComfyUI loads an fp8_scaled file of its weights (what
    `load_diffusion_model_state_dict` does after detecting the `scaled_fp8` marker)."""
    import copy

    import comfy.model_patcher

    from comfy_para_attn.testing.tiny_files import fp8_scaled_state_dict

    sd = fp8_scaled_state_dict(model.model.diffusion_model.state_dict())
    marker = sd.pop("scaled_fp8")
    config = copy.deepcopy(model.model.model_config)
    config.scaled_fp8 = marker.dtype
    config.optimizations["fp8"] = marker.numel() != 2
    config.set_inference_dtype(torch.bfloat16, None)
    scaled = config.get_model({}, "")
    scaled.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(scaled, load_device=device, offload_device=model.offload_device)


def run_one(args) -> dict:
    """One configuration, in this process."""
    from comfy_para_attn.adapters.comfy.env import find_comfyui, make_importable

    device = torch.device(args.device)
    make_importable(args.comfyui or find_comfyui(), cpu=device.type == "cpu")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management
    import comfy.model_patcher

    from comfy_para_attn.testing import comfy_models as cm

    side, steps, tokens = (16, 4, 8) if args.tiny else (128, args.steps, 512)
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    built = cm.build("flux", dtype=dtype, device=device, **cm.flux_config("tiny" if args.tiny else "dev"))
    # A real loader keeps the model on the offload device (CPU) until sampling loads it.
    built.model.to("cpu")
    model = comfy.model_patcher.ModelPatcher(built.model, load_device=device,
                                             offload_device=comfy.model_management.unet_offload_device())
    build_s = time.perf_counter() - t0
    quantize_s = _time_quantization()
    m = _configure(args.only, model, device, cm)
    positive = cm.conditioning(model, tokens=tokens, seed=1)
    latent = torch.zeros(cm.latent_shape("flux", height=side, width=side))

    def run():
        _sync(device)
        start = time.perf_counter()
        out = cm.sample(m, positive, [], latent, steps=steps, cfg=1.0)
        _sync(device)
        return time.perf_counter() - start, out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first, out = run()
    first_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [run()[0] for _ in range(args.repeats)]
    steady = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    from torch._dynamo.utils import compilation_time_metrics

    compile_s = sum(compilation_time_metrics.get("_compile.compile_inner", []))
    return dict(config=args.only, ms_per_step=steady / steps * 1e3, warmup_s=first - steady, first_run_s=first,
                compile_s=compile_s, quantize_s=sum(quantize_s),
                peak_gib=peak, first_peak_gib=first_peak, finite=bool(torch.isfinite(out).all()),
                build_s=build_s, steps=steps, side=side * 8,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, attention=comfy_attention.optimized_attention.__name__,
                sdpa=_sdpa_backends() if device.type == "cuda" else "-")


def _time_quantization() -> list:
    """Seconds spent quantizing at each model load (FP8 Quantize's ON_LOAD work), appended to
    the returned list: wraps the function the callback calls."""
    from comfy_para_attn.adapters.comfy import fp8

    seconds, quantize = [], fp8.quantize_loaded_model

    def timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return quantize(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - began)

    fp8.quantize_loaded_model = timed
    return seconds


def _sdpa_backends() -> str:
    b = torch.backends.cuda
    flags = {"flash": b.flash_sdp_enabled(), "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: False)(),
             "mem_efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled()}
    return "SDPA enabled: " + ", ".join(k for k, v in flags.items() if v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny Flux, 128x128, 4 steps: a smoke test")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after the first (median)")
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                    help=f"comma-separated, from {', '.join(DEFAULT_CONFIGS + EXTRA_CONFIGS)}")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI source tree")
    ap.add_argument("--warm-cache", action="store_true", help="share one inductor cache (warm-up not cold)")
    ap.add_argument("--only", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only:
        result = run_one(args)
        Path(args.result).write_text(json.dumps(result))
        return
    if not args.comfyui:
        sys.exit("ComfyUI not found: pass --comfyui or set COMFYUI_PATH")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(DEFAULT_CONFIGS + EXTRA_CONFIGS)
    if unknown:
        sys.exit(f"unknown configs: {', '.join(sorted(unknown))}")
    results, shared_cache = [], tempfile.mkdtemp(prefix="inductor_")
    for name in configs:
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=shared_cache if args.warm_cache else tmp + "/inductor",
                       TRITON_CACHE_DIR=(shared_cache if args.warm_cache else tmp) + "/triton",
                       **ENV_OF_CONFIG.get(name, {}))
            cmd = [sys.executable, __file__, "--only", name, "--result", tmp + "/r.json", "--device", args.device,
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--comfyui", str(args.comfyui)]
            cmd += ["--tiny"] if args.tiny else []
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0 or not Path(tmp + "/r.json").exists():
                print(f"[{name}] FAILED (exit {proc.returncode}) after {time.perf_counter() - started:.0f}s:\n"
                      f"{proc.stderr[-3000:]}", flush=True)
                results.append(dict(config=name, failed=True))
                continue
            results.append(json.loads(Path(tmp + "/r.json").read_text()))
            r = results[-1]
            print(f"[{name}] {r['ms_per_step']:.1f} ms/step, warm-up {r['warmup_s']:.1f} s, "
                  f"{time.perf_counter() - started:.0f}s total", flush=True)
    ok = [r for r in results if not r.get("failed")]
    if not ok:
        sys.exit("every configuration failed")
    r0 = ok[0]
    print(f"\ndevice: {r0['device']}; torch {r0['torch']}; ComfyUI attention: {r0['attention']} ({r0['sdpa']})")
    print(f"model: ComfyUI Flux {'tiny' if args.tiny else 'FLUX.1-dev size'} (random weights), "
          f"{r0['side']}x{r0['side']}, {r0['steps']} steps, cfg 1, euler\n")
    base = next((r["ms_per_step"] for r in ok if r["config"] == "comfy_bf16"), None)
    print("| configuration | ms/step | vs ComfyUI bf16 | warm-up (s) | of it: compile / fp8 quantize (s) "
          "| first run (s) | peak GiB (steady) | peak GiB (first run) | finite |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("failed"):
            print(f"| {r['config']} | FAILED | | | | | | | |")
            continue
        ratio = f"{r['ms_per_step'] / base:.3f}" if base else "-"
        print(f"| {r['config']} | {r['ms_per_step']:.1f} | {ratio} | {r['warmup_s']:.1f} "
              f"| {r.get('compile_s', 0):.1f} / {r.get('quantize_s', 0):.2f} | {r['first_run_s']:.1f} "
              f"| {r['peak_gib']:.2f} | {r['first_peak_gib']:.2f} | {r['finite']} |")
    print("\nTargets: ours_fp8_regional <= 0.48 of comfy_bf16, warm-up <= 30 s.")


if __name__ == "__main__":
    main()
