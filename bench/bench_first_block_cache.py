"""First Block Cache benchmark on a ComfyUI Flux model with random weights.

    python bench/bench_first_block_cache.py [--device cuda] [--size dev|tiny]

`--size dev`: FLUX.1-dev shapes (19 double + 38 single blocks, width 3072), bf16, 1024x1024,
28 steps, cfg 1 (guidance-distilled: one model call per step). `--size tiny` runs on CPU in
seconds (a smoke test of this script). Baseline and our path are measured in the same run:

1. end-to-end sampling through ComfyUI (`comfy.sample.sample`): plain model, threshold 0
   (node present, cache off), threshold 1e-9 (every step compared and stored, never reused:
   the full bookkeeping overhead), then a few thresholds with their reuse counts;
2. single model calls (the diffusion model called directly): a full step, a computed step
   with bookkeeping, and a reused step (target: <= 6% of a full step).

Random weights cannot judge image quality: the reuse counts per threshold show the mechanism
only; real FLUX residuals change differently from step to step. Needs torch + ComfyUI only.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_para_attn.adapters.comfy.env import find_comfyui, make_importable  # noqa: E402

SIZES = {  # size -> (latent height/width, steps, text tokens, dtype on cuda)
    "dev": (128, 28, 512),
    "tiny": (16, 6, 8),
}
THRESHOLDS = (0.05, 0.12, 0.2, 0.3, 0.5, 1.0)


class _ReuseLog(logging.Handler):
    """Reads our own log line: 'First Block Cache: reused K of N model calls (...)'."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.last = None

    def emit(self, record):
        m = re.search(r"First Block Cache: reused (\d+) of (\d+)", record.getMessage())
        if m:
            self.last = (int(m.group(1)), int(m.group(2)))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (median)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    path = find_comfyui() or os.environ.get("COMFYUI_PATH")
    if path is None:
        sys.exit("ComfyUI not found: set COMFYUI_PATH")
    make_importable(path, cpu=device.type == "cpu")
    logging.basicConfig(level=logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)  # keep ComfyUI's INFO chatter off the console
    reuse_log = _ReuseLog()
    logging.getLogger().addHandler(reuse_log)

    import comfy.ldm.modules.attention as comfy_attention

    from comfy_para_attn.adapters.comfy.first_block_cache import STATE_KEY, FirstBlockCacheRun, apply_first_block_cache
    from comfy_para_attn.cache import FirstBlockCacheSettings as Settings
    from comfy_para_attn.testing import comfy_models as cm

    side, steps, tokens = SIZES[args.size]
    repeats = args.repeats or (3 if args.size == "dev" else 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = cm.build("flux", dtype=dtype, device=device, **cm.flux_config(args.size))
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"attention: {comfy_attention.optimized_attention.__name__}; dtype {dtype}")
    print(f"model: ComfyUI Flux '{args.size}', {n_params / 1e9:.2f}B params (random weights), built in "
          f"{time.perf_counter() - t0:.1f}s; latent {side}x{side} ({side * 8}px), {steps} steps, cfg 1")
    positive = cm.conditioning(model, tokens=tokens, seed=1, device=device)
    latent = torch.zeros(cm.latent_shape("flux", height=side, width=side))

    def run(m):
        return cm.sample(m, positive, [], latent, steps=steps, cfg=1.0)

    configs = [("plain", model), ("threshold 0 (off)", apply_first_block_cache(model, Settings(0.0))),
               ("threshold 1e-9 (never reuses)", apply_first_block_cache(model, Settings(1e-9)))]
    configs += [(f"threshold {t:g}", apply_first_block_cache(model, Settings(t))) for t in THRESHOLDS]
    finite, reuse, times = {}, {}, {label: [] for label, _ in configs}
    for label, m in configs:  # warm-up: loads the model, allocates; records reuse counts
        reuse_log.last = None
        finite[label] = bool(torch.isfinite(run(m)).all())
        reuse[label] = reuse_log.last
    for _ in range(repeats):  # interleaved rounds, so drift hits every configuration alike
        for label, m in configs:
            times[label].append(_timed(lambda: run(m), device, 1))
    rows = [(label, statistics.median(times[label]), reuse[label], finite[label]) for label, _ in configs]
    plain = rows[0][1]

    # single model calls
    dm = model.model.diffusion_model
    patched = apply_first_block_cache(model, Settings(0.5))
    x = torch.randn(1, 16, side, side, device=device, dtype=dtype)
    ctx = positive[0][0].to(device, dtype)
    kw = dict(y=positive[0][1]["pooled_output"].to(device, dtype), guidance=torch.tensor([3.5], device=device))
    sigma = torch.tensor([0.7], device=device)

    def options(run_state, s):
        return dict(patched.model_options["transformer_options"], sigmas=torch.tensor([s], device=device),
                    cond_or_uncond=[0], uuids=["c"], **{STATE_KEY: run_state})

    with torch.inference_mode():
        full = _timed(lambda: dm(x, sigma, ctx, transformer_options={}, **kw), device, repeats + 2)
        state = {"s": 0.7}

        def computed():  # a miss with bookkeeping: fresh state, first call always computes
            dm(x, sigma, ctx, transformer_options=options(FirstBlockCacheRun(Settings(0.5), text_first=True), 0.7), **kw)

        miss = _timed(computed, device, repeats + 2)
        hit_run = FirstBlockCacheRun(Settings(0.5), text_first=True)
        dm(x, sigma, ctx, transformer_options=options(hit_run, 0.7), **kw)

        def reused():  # the next step a hair lower: the first block barely changes -> reuse
            state["s"] -= 1e-4
            dm(x, sigma, ctx, transformer_options=options(hit_run, state["s"]), **kw)

        hit = _timed(reused, device, repeats + 2)
        assert hit_run.cache.hits == hit_run.cache.calls - 1, hit_run.cache.history

    print()
    print(f"| configuration | reused / model calls | time per image (s) | vs plain |")
    print(f"|---|---|---|---|")
    for label, t, reuse, finite in rows:
        r = f"{reuse[0]} / {reuse[1]}" if reuse else "-"
        print(f"| {label} | {r} | {t:.3f} | {t / plain:.3f}x{'' if finite else ' (NON-FINITE)'} |")
    print()
    print(f"| single model call | time (ms) | vs full step |")
    print(f"|---|---|---|")
    for label, t in (("full step (plain)", full), ("computed step + bookkeeping", miss), ("reused step", hit)):
        print(f"| {label} | {t * 1e3:.2f} | {t / full:.3f} |")
    print()
    print(f"overhead at threshold 0: {(rows[1][1] / plain - 1) * 100:+.2f}% (target <= 2%); "
          f"never-reusing bookkeeping: {(rows[2][1] / plain - 1) * 100:+.2f}%; "
          f"reused step: {hit / full * 100:.1f}% of a full step (target <= 6%)")
    print("Random weights: reuse counts show the mechanism, not image quality.")


if __name__ == "__main__":
    main()
