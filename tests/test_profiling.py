"""The profile summary that bench/profile_context_parallel.py prints and that pool workers log
with PARA_ATTN_PROFILE (CPU: host ops only; the GPU split is checked by the GPU benches)."""
import math

import torch

from comfy_para_attn.profiling import describe, idle_gaps, kernel_summary


def test_a_cpu_profile_names_its_host_ops_and_reports_no_gpu_time():
    a = torch.randn(256, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(4):  # two "steps" of two matmuls each
            a = torch.mm(a, a).tanh()
    summary = kernel_summary(prof, steps=2)
    assert math.isnan(summary["gpu_busy"]) and summary["top"] == []
    mm = [count for key, _, count in summary["cpu_top"] if key == "aten::mm"]
    assert mm == [2], summary["cpu_top"]  # per step
    assert idle_gaps(prof, steps=2) == []
    lines = describe(prof, steps=2, wall_s=0.05)
    assert lines[0].startswith("profile: 25.0 ms/step, GPU busy nan"), lines
    assert any(line.startswith("profile: host ") and line.endswith("aten::mm") for line in lines), lines
