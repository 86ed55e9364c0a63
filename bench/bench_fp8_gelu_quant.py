"""The fused row-wise fp8 quantization kernels against inductor's code for the same
computation, at FLUX.1-dev's shapes (1024x1024: 4608 tokens).

    python bench/bench_fp8_gelu_quant.py [--repeats 50]

Rows: the GELU kernel on the single-block `linear2` input (cat(attention 3072, gelu(mlp
12288)), 4608 rows) and a double block's MLP output layer input (gelu(12288), 4096 rows);
the LayerNorm + modulation kernel on the single block's `linear1` input (4608 x 3072) and a
double block's image qkv input (4096 x 3072). Columns: our Triton kernel, torch.compile of
the plain computation (what the model got before), eager torch; GPU microseconds per call
(calls replayed from a CUDA graph), effective GB/s (bf16 read + fp8 write), and the ratio.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy_para_attn.kernels.fp8_rowwise import (gelu_tail_rowwise_fp8_reference, gelu_tail_rowwise_fp8_triton,  # noqa: E402
                                 layer_norm_modulate_rowwise_fp8, layer_norm_modulate_rowwise_fp8_reference)


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


def _compare(name, m, k, ours_fn, compiled, inputs, eager_fn, repeats):
    q, s = ours_fn()
    q_ref, s_ref = compiled(*inputs)
    differ = (q.float() != q_ref.float()).float().mean().item()
    ours = _time_us(ours_fn, repeats)
    inductor = _time_us(lambda: compiled(*inputs), repeats)
    eager = _time_us(lambda: eager_fn(*inputs), repeats)
    gbytes = m * k * 3 / 1e9  # bf16 in, fp8 out
    return name, m, k, ours, inductor, eager, gbytes / (ours * 1e-6), differ, torch.equal(s, s_ref)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="also time the kernel at 4, 8, 16 and 32 warps")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs CUDA"
    print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__}")
    rows = []
    for name, m, k, start in (("single block linear2", 4608, 15360, 3072), ("double block MLP out", 4096, 12288, 0)):
        x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
        rows.append(_compare(name, m, k, lambda: gelu_tail_rowwise_fp8_triton(x, start),
                             torch.compile(gelu_tail_rowwise_fp8_reference, dynamic=False), (x, start),
                             gelu_tail_rowwise_fp8_reference, args.repeats))
    for name, m in (("single block linear1 (LayerNorm)", 4608), ("double block qkv (LayerNorm)", 4096)):
        x = (torch.randn(1, m, 3072, device="cuda") * 2 + 0.5).to(torch.bfloat16)
        shift, scale = (torch.randn(1, 1, 2 * 3072, device="cuda") * 0.5).to(torch.bfloat16).chunk(2, dim=-1)
        inputs = (x, 1 + scale, shift, 1e-6)
        rows.append(_compare(name, m, 3072, lambda: layer_norm_modulate_rowwise_fp8(*inputs),
                             torch.compile(layer_norm_modulate_rowwise_fp8_reference, dynamic=False), inputs,
                             layer_norm_modulate_rowwise_fp8_reference, args.repeats))
    if args.sweep:
        from comfy_para_attn.kernels import triton_fp8_rowwise

        print("\n| input | " + " | ".join(f"{w} warps us" for w in (4, 8, 16, 32)) + " |\n|---|---|---|---|---|")
        for name, m, k, start in (("single block linear2", 4608, 15360, 3072), ("double block MLP out", 4096, 12288, 0)):
            x = (torch.randn(m, k, device="cuda") * 2).to(torch.bfloat16)
            times = []
            for warps in (4, 8, 16, 32):
                triton_fp8_rowwise.NUM_WARPS = warps
                times.append(_time_us(lambda: gelu_tail_rowwise_fp8_triton(x, start), args.repeats))
            triton_fp8_rowwise.NUM_WARPS = None
            print(f"| {name} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
        x = (torch.randn(1, 4608, 3072, device="cuda") * 2 + 0.5).to(torch.bfloat16)
        mul, shift = torch.ones(1, 1, 3072, device="cuda", dtype=torch.bfloat16), x[:, :1]
        times = []
        for warps in (4, 8, 16, 32):
            triton_fp8_rowwise.NUM_WARPS = warps
            times.append(_time_us(lambda: layer_norm_modulate_rowwise_fp8(x, mul, shift, 1e-6), args.repeats))
        triton_fp8_rowwise.NUM_WARPS = None
        print("| single block linear1 (LayerNorm) | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\n| input | rows x cols | ours us | inductor us | eager us | ours GB/s | inductor / ours | "
          "fp8 values differing | scales equal |\n|---|---|---|---|---|---|---|---|---|")
    for name, m, k, ours, inductor, eager, rate, differ, same in rows:
        print(f"| {name} | {m} x {k} | {ours:.1f} | {inductor:.1f} | {eager:.1f} | {rate:.0f} | {inductor / ours:.2f}x | "
              f"{differ:.2e} | {same} |")


if __name__ == "__main__":
    main()
