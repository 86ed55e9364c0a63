"""Pick the fastest attention backend that meets the accuracy bar on this GPU.

`fastest_accurate` measures each candidate's accuracy against the fp32 reference on random
and on realistically scaled inputs (with a key padding bias when asked), then times the
accurate ones. A candidate that raises, misses the bar, or silently falls back is out.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch

from ._runtime import AttentionFn
from .reference import FLASH_BAR, attention_reference, compare, meets_bar, padding_bias, random_inputs, realistic_inputs

log = logging.getLogger("comfy_para_attn.kernels")


def time_ms(fn, *args, warmup: int = 3, iters: int = 10) -> float:
    """Mean CUDA-event time of fn(*args) in ms, calls issued back to back (the first warmup
    call also autotunes). Back to back, as inside a model, the host's per-call work hides
    behind the GPU's; timed one call at a time it did not, and the Triton path's Python
    (custom op, checks) showed as 0.57x of cuDNN at FLUX's shape where the kernel runs at
    0.73x (H100, bench/sweep_flash_configs.py)."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def accuracy(fn: AttentionFn, dtype, head_dim: int, device, with_bias: bool, seq: int = 1000) -> dict:
    """Worst metrics of `fn` over random and realistic inputs [1, 4, seq, head_dim]."""
    worst = {"rel_l2": 0.0, "cosine": 1.0, "lse_abs": 0.0}
    for make in (random_inputs, realistic_inputs):
        q, k, v = make((1, 4, seq, head_dim), dtype, device=device, seed=7)
        bias = padding_bias(1, seq, seq - seq // 8, dtype, device) if with_bias else None
        ref_out, ref_lse = attention_reference(q, k, v, bias)
        out, lse = fn(q, k, v, bias, None)
        metrics = compare(out, lse, ref_out, ref_lse)
        worst = {
            "rel_l2": max(worst["rel_l2"], metrics["rel_l2"]),
            "cosine": min(worst["cosine"], metrics["cosine"]),
            "lse_abs": max(worst["lse_abs"], metrics["lse_abs"]),
        }
    return worst


def fastest_accurate(
    candidates: Dict[str, AttentionFn],
    *,
    dtype=torch.bfloat16,
    head_dim: int = 128,
    with_bias: bool = False,
    device=None,
    bar: Optional[dict] = None,
    timing_shape=(1, 24, 4096),
) -> tuple:
    """(name of the fastest candidate meeting `bar`, {name: report}). Name None if none does."""
    device = torch.device(device or "cuda")
    bar = bar or FLASH_BAR
    reports = {}
    for name, fn in candidates.items():
        try:
            metrics = accuracy(fn, dtype, head_dim, device, with_bias)
        except Exception as exc:  # a backend that cannot run here is simply not a candidate
            reports[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        report = dict(metrics, accurate=meets_bar(metrics, bar))
        if report["accurate"]:
            batch, heads, seq = timing_shape
            q, k, v = random_inputs((batch, heads, seq, head_dim), dtype, device=device, seed=1)
            bias = padding_bias(batch, seq, seq - seq // 8, dtype, device) if with_bias else None
            report["ms"] = time_ms(fn, q, k, v, bias, None)
        reports[name] = report
    timed = {name: r["ms"] for name, r in reports.items() if "ms" in r}
    winner = min(timed, key=timed.get) if timed else None
    log.info("attention backend for %s D=%d bias=%s on %s: %s (%s)", dtype, head_dim, with_bias,
             torch.cuda.get_device_name(device), winner, reports)
    return winner, reports
