"""Modulation layers of one FLUX.1-dev step: bf16 `F.linear` against int8 weights
(`kernels.int8_linear`), in one run.

    python bench/bench_int8_linear.py [--rows 1] [--iters 20]

A step runs 19 double blocks x 2 layers 3072 -> 18432, 38 single blocks x 3072 -> 9216 and
the final layer's 3072 -> 6144, each on one row per image. Prints the time of the whole set
(back to back, CUDA events), the weight bytes read per second and the error of the int8
layers against the bf16 ones.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from comfy_para_attn.kernels.int8_linear import int8_linear, quantize_weight_int8  # noqa: E402
from comfy_para_attn.kernels.selection import time_ms as _time_ms  # noqa: E402

HIDDEN = 3072
LAYERS = [(6 * HIDDEN, 38), (3 * HIDDEN, 38), (2 * HIDDEN, 1)]  # (out features, count) per step


def time_ms(fn, iters):
    return _time_ms(fn, iters=iters)


def graph_ms(fn, iters):
    """The same work replayed as one CUDA graph: GPU time without the host's launches."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, iters)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1, help="rows per call (images in the batch)")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = []
    for out_features, count in LAYERS:
        for _ in range(count):
            w = (torch.randn(out_features, HIDDEN, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
            b = (torch.randn(out_features, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
            w8, scale = quantize_weight_int8(w)
            layers.append((w, b, w8, scale))
    x = torch.nn.functional.silu(torch.randn(args.rows, HIDDEN, device="cuda", generator=g)).to(torch.bfloat16)

    def bf16():
        for w, b, _, _ in layers:
            F.linear(x, w, b)

    def int8():
        for _, b, w8, scale in layers:
            int8_linear(x, w8, scale, b)

    errors = []
    for w, b, w8, scale in layers[:: max(1, len(layers) // 8)]:
        ref = F.linear(x.float(), w.float(), b.float())
        out = int8_linear(x, w8, scale, b).float()
        errors.append((torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item())
    bf16_bytes = sum(w.numel() * 2 for w, *_ in layers)
    int8_bytes = sum(w8.numel() + scale.numel() * 4 for _, _, w8, scale in layers)
    print(f"{len(layers)} layers, {args.rows} row(s); weights bf16 {bf16_bytes / 1e9:.2f} GB, int8 {int8_bytes / 1e9:.2f} GB")
    print(f"{'timing':>18} {'bf16 ms':>8} {'GB/s':>6} {'int8 ms':>8} {'GB/s':>6} {'int8/bf16':>9}")
    for label, timer in (("eager, back to back", time_ms), ("CUDA graph", graph_ms)):
        b, i = timer(bf16, args.iters), timer(int8, args.iters)
        print(f"{label:>18} {b:8.3f} {bf16_bytes / b / 1e6:6.0f} {i:8.3f} {int8_bytes / i / 1e6:6.0f} {i / b:9.3f}")
    print(f"rel. L2 error of int8 vs fp32 with the bf16 weights: max {max(errors):.2e}")


if __name__ == "__main__":
    main()
