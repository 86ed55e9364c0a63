"""The fused GELU + row-wise fp8 quantization kernel against inductor's code for the same
computation, at FLUX.1-dev's shapes (1024x1024: 4608 tokens).

    python bench/bench_fp8_gelu_quant.py [--repeats 50]

Rows: single-block `linear2` input (cat(attention 3072, gelu(mlp 12288)), 4608 rows) and a
double block's MLP output layer input (gelu(12288), 4096 rows). Columns: our Triton kernel,
torch.compile of the plain computation (what the model got before), eager torch; GPU
microseconds per call (calls replayed from a CUDA graph), effective GB/s (bf16 read + fp8 write), and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels.fp8_rowwise import gelu_tail_rowwise_fp8_reference, gelu_tail_rowwise_fp8_triton  # noqa: E402


def _time_us(fn, repeats: int) -> float:
    """GPU microseconds per call: `repeats` calls captured in one CUDA graph and replayed, so
    the host's per-call cost (a Python op dispatch is ~as long as the kernel) is not timed."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeats


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel at 4, 8, 16 and 32 warps")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__}")
    compiled = torch.compile(gelu_tail_rowwise_fp8_reference, dynamic=False)
    rows = []
    for name, m, k, start in (("single block linear2", 4608, 15360, 3072), ("double block MLP out", 4096, 12288, 0)):
        x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
        q, s = gelu_tail_rowwise_fp8_triton(x, start)
        q_ref, s_ref = compiled(x, start)
        differ = (q.float() != q_ref.float()).float().mean().item()
        ours = _time_us(lambda: gelu_tail_rowwise_fp8_triton(x, start), args.repeats)
        inductor = _time_us(lambda: compiled(x, start), args.repeats)
        eager = _time_us(lambda: gelu_tail_rowwise_fp8_reference(x, start), args.repeats)
        gbytes = m * k * 3 / 1e9  # bf16 in, fp8 out
        rows.append((name, m, k, ours, inductor, eager, gbytes / (ours * 1e-6), differ, torch.equal(s, s_ref)))
    if args.sweep:
        from kernels import triton_fp8_rowwise

        print("\n| input | " + " | ".join(f"{w} warps us" for w in (4, 8, 16, 32)) + " |\n|---|---|---|---|---|")
        for name, m, k, start in (("single block linear2", 4608, 15360, 3072), ("double block MLP out", 4096, 12288, 0)):
            x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
            times = []
            for warps in (4, 8, 16, 32):
                triton_fp8_rowwise.NUM_WARPS = warps
                times.append(_time_us(lambda: gelu_tail_rowwise_fp8_triton(x, start), args.repeats))
            triton_fp8_rowwise.NUM_WARPS = None
            print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\n| input | rows x cols | ours us | inductor us | eager us | ours GB/s | inductor / ours | "
          "fp8 values differing | scales equal |\n|---|---|---|---|---|---|---|---|---|")
    for name, m, k, ours, inductor, eager, rate, differ, same in rows:
        print(f"| {name} | {m} x {k} | {ours:.1f} | {inductor:.1f} | {eager:.1f} | {rate:.0f} | {inductor / ours:.2f}x | "
              f"{differ:.2e} | {same} |")


if __name__ == "__main__":
    main()
