"""What a profiled stretch of GPU work spent its time on: kernel time split into NCCL /
attention / the rest, the GPU's idle gaps and what preceded them, and the host syncs. Used by
`bench/profile_context_parallel.py` and, with `PARA_ATTN_PROFILE=1`, by the pool's sampling
job (each rank's summary then goes to the ComfyUI log)."""
from __future__ import annotations

import torch


# Attention kernels by name: cuDNN / flash / efficient SDPA, our Triton kernels and the quantized
# kernel's pre-pass (its int8 / fp8 quantization is part of the attention's cost).
ATTENTION_KERNEL_MARKS = ("flash", "fmha", "sdpa", "quantized_attention", "quantize_rows_int8", "quantize_v_fp8")


def kernel_summary(prof, steps: int, top_n: int = 12) -> dict:
    """Per-step GPU kernel time split into NCCL / attention / rest, the top kernels, and
    the top CPU ops by self time (host syncs such as cudaStreamSynchronize show up there)."""
    averages = prof.key_averages()
    cpu = sorted((e for e in averages if e.device_type.name == "CPU"), key=lambda e: -e.self_cpu_time_total)[:10]
    cpu_top = [(e.key[:90], e.self_cpu_time_total / 1e3 / steps, e.count // steps) for e in cpu]
    events = [e for e in averages if e.device_type.name in ("CUDA", "PrivateUse1") and not e.key.startswith("nccl:")]
    if not events:  # CPU run: nothing to split
        return {"gpu_busy": float("nan"), "nccl": float("nan"), "attention": float("nan"), "top": [], "cpu_top": cpu_top}
    total = sum(e.self_device_time_total for e in events) / 1e3 / steps
    nccl = sum(e.self_device_time_total for e in events if "nccl" in e.key.lower()) / 1e3 / steps
    attn = sum(e.self_device_time_total for e in events
               if any(s in e.key.lower() for s in ATTENTION_KERNEL_MARKS)) / 1e3 / steps
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:top_n]
    return {"gpu_busy": total, "nccl": nccl, "attention": attn, "cpu_top": cpu_top,
            "top": [(e.key[:110], e.self_device_time_total / 1e3 / steps, e.count // steps) for e in top]}


def idle_gaps(prof, steps: int, threshold_us: float = 10.0) -> list[tuple[str, float, int]]:
    """Where the GPU sits idle: gaps (> threshold) in the union of all kernels on all
    streams, each put down to the kernel that ended last before it; (kernel, ms/step,
    gaps/step), largest first. Idle after NCCL means waiting on the other rank's launch or
    on the host; idle after the step's last kernel means the host (a sync, then launches)."""
    from collections import defaultdict

    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type.name in ("CUDA", "PrivateUse1")), key=lambda k: k[0])
    idle, count = defaultdict(float), defaultdict(int)
    end, last = None, ""
    for start, stop, name in kernels:
        if end is not None and start - end > threshold_us:
            idle[last] += start - end
            count[last] += 1
        if end is None or stop > end:
            end, last = stop, name
    top = sorted(idle, key=lambda k: -idle[k])[:8]
    return [(name[:80], idle[name] / 1e3 / steps, count[name] // steps) for name in top]


def host_syncs(run) -> list[tuple[str, int]]:
    """Run `run()` with CUDA's sync debug mode on; return the (call site, count) of each place
    that made the host wait for the GPU (a drained queue idles the GPU while the next
    kernels are launched). A warning raised in C++ names the Python line that called the op."""
    import warnings
    from collections import Counter

    sites = Counter()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for warning in caught:
        if "synchroniz" in str(warning.message).lower():
            sites[f"{warning.filename}:{warning.lineno}"] += 1
    return sites.most_common(12)


def describe(prof, steps: int, wall_s: float, top_n: int = 6) -> list[str]:
    """Log lines for a profile of `steps` sampling steps that took `wall_s` seconds."""
    summary = kernel_summary(prof, steps, top_n)
    lines = [f"profile: {wall_s / steps * 1e3:.1f} ms/step, GPU busy {summary['gpu_busy']:.1f}, NCCL "
             f"{summary['nccl']:.1f}, attention {summary['attention']:.1f} ms/step"]
    lines += [f"profile: GPU idle {ms:.2f} ms/step in {count} gaps after {name}" for name, ms, count in idle_gaps(prof, steps)[:top_n]]
    lines += [f"profile: kernel {ms:.2f} ms/step x{count} {key}" for key, ms, count in summary["top"]]
    lines += [f"profile: host {ms:.2f} ms/step x{count} {key}" for key, ms, count in summary["cpu_top"]]
    return lines
