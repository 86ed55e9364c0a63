"""The q/k RMSNorm + rotary kernel (`kernels.qk_norm_rope`) against inductor's code for the
same computation, at FLUX.1-dev's shapes (1024x1024: 512 text + 4096 image tokens, 24 heads
of 128).

    python bench/bench_qk_norm_rope.py [--repeats 50] [--sweep]

Rows: a single block's q (one piece, a strided view of the qkv projection) and a double
block's q (text and image pieces, each normalized with its own weight, concatenated).
Columns: our kernel, torch.compile of the plain computation, eager torch; GPU microseconds per
call (replayed from a CUDA graph), effective GB/s (bf16 in and out), the ratio. `--sweep`
times tile shapes (tokens per program, heads per step, head slices, warps). The pair table
times a block's q and k as two calls against one pair call, cold: the calls cycle through 4
sets of inputs (~350 MB, beyond the L2 cache), as in a model where the qkv projection's output
is not in L2 when the kernel reads it.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_fp8_gelu_quant import _time_us  # noqa: E402
from comfy_para_attn.kernels.qk_norm_rope import rms_norm_rope, rms_norm_rope_pair, rms_norm_rope_reference  # noqa: E402

HEADS, DIM = 24, 128


def _inputs(lengths):
    """(q pieces, q weights, pe): one block's queries."""
    qs, _, q_weights, _, pe = _qk_inputs(lengths)
    return qs, q_weights, pe


def _qk_inputs(lengths, seed=None):
    """(q pieces, k pieces, q weights, k weights, pe): q and k strided views of one qkv."""
    if seed is not None:
        torch.manual_seed(seed)
    qs, ks = [], []
    for n in lengths:
        qkv = (torch.randn(1, n, 3 * HEADS * DIM, device="cuda") * 2).to(torch.bfloat16)
        q, k, _ = qkv.view(1, n, 3, HEADS, DIM).permute(2, 0, 3, 1, 4)
        qs.append(q)
        ks.append(k)
    weights = [(torch.rand(DIM, device="cuda") + 0.5).to(torch.bfloat16) for _ in 2 * lengths]
    angle = torch.rand(1, 1, sum(lengths), DIM // 2, device="cuda") * 6
    pe = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], -1).reshape(1, 1, sum(lengths), DIM // 2, 2, 2)
    return qs, ks, weights[:len(lengths)], weights[len(lengths):], pe


def _cold_us(fn, repeats: int, sets: int = 4) -> float:
    """`_time_us` of calls that cycle through `sets` input sets (`fn(i)`), so no call finds
    its inputs in L2."""
    calls = iter(range(10**9))
    return _time_us(lambda: fn(next(calls) % sets), repeats)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--seq-major", action="store_true", help="q and k written [B, S, H, D] (what the fold "
                        "asks for in front of PyTorch attention)")
    args = parser.parse_args()
    layout = dict(seq_major=args.seq_major)
    assert torch.cuda.is_available(), "needs CUDA"
    from comfy_para_attn.kernels import triton_qk_norm_rope as kernel

    print(f"device: {torch.cuda.get_device_name(0)} | torch {torch.__version__} | seq_major {args.seq_major}")
    compiled = torch.compile(rms_norm_rope_reference, dynamic=False)
    cases = (("single block q", (4608,)), ("double block q (text, image)", (512, 4096)))
    sets = {name: [_qk_inputs(lengths, seed) for seed in range(4)] for name, lengths in cases}
    if args.sweep:
        default = kernel.PAIR_TILE
        shapes = [(16, 2, 1, 4), (8, 2, 1, 4), (16, 2, 2, 4), (16, 1, 1, 4), (32, 1, 1, 4), (16, 2, 1, 2),
                  (32, 2, 1, 8), (16, 4, 3, 8), (8, 4, 1, 4), (8, 8, 1, 4), (4, 8, 1, 4), (16, 8, 3, 8)]
        print("\n| tokens, heads per step, slices, warps | " + " | ".join(f"{n}: pair, cold" for n, _ in cases)
              + " |\n|---|---|---|")
        for shape in shapes:
            kernel.PAIR_TILE = shape
            times = [_cold_us(lambda i, n=name: rms_norm_rope_pair(*sets[n][i], 1e-6, **layout), args.repeats)
                     for name, _ in cases]
            print(f"| {shape} | " + " | ".join(f"{t:.1f} us" for t in times) + " |")
        kernel.PAIR_TILE = default
    print("\n| block's q and k, cold | two calls us | pair call us | pair GB/s | two / pair | max abs diff vs eager |\n"
          "|---|---|---|---|---|---|")
    for name, lengths in cases:
        qs, ks, wq, wk, pe = sets[name][0]
        q, k = rms_norm_rope_pair(qs, ks, wq, wk, pe, 1e-6, **layout)
        diff = max((q.float() - rms_norm_rope_reference(qs, wq, pe, 1e-6).float()).abs().max().item(),
                   (k.float() - rms_norm_rope_reference(ks, wk, pe, 1e-6).float()).abs().max().item())
        two = _cold_us(lambda i, n=name: (rms_norm_rope(sets[n][i][0], sets[n][i][2], sets[n][i][4], 1e-6, **layout),
                                          rms_norm_rope(sets[n][i][1], sets[n][i][3], sets[n][i][4], 1e-6, **layout)),
                       args.repeats)
        pair = _cold_us(lambda i, n=name: rms_norm_rope_pair(*sets[n][i], 1e-6, **layout), args.repeats)
        gbytes = (4 * sum(lengths) * HEADS * DIM * 2 + sum(lengths) * DIM * 2 * 4) / 1e9
        print(f"| {name} | {two:.1f} | {pair:.1f} | {gbytes / (pair * 1e-6):.0f} | {two / pair:.2f}x | {diff:.3g} |")
    print("\n| input | ours us | inductor us | eager us | ours GB/s | inductor / ours | max abs diff vs eager |\n"
          "|---|---|---|---|---|---|---|")
    for name, lengths in cases:
        pieces, weights, pe = _inputs(lengths)
        out = rms_norm_rope(pieces, weights, pe, 1e-6)
        diff = (out.float() - rms_norm_rope_reference(pieces, weights, pe, 1e-6).float()).abs().max().item()
        ours = _time_us(lambda: rms_norm_rope(pieces, weights, pe, 1e-6), args.repeats)
        inductor = _time_us(lambda: compiled(pieces, weights, pe, 1e-6), args.repeats)
        eager = _time_us(lambda: rms_norm_rope_reference(pieces, weights, pe, 1e-6), args.repeats)
        gbytes = 2 * sum(lengths) * HEADS * DIM * 2 / 1e9
        print(f"| {name} | {ours:.1f} | {inductor:.1f} | {eager:.1f} | {gbytes / (ours * 1e-6):.0f} | "
              f"{inductor / ours:.2f}x | {diff:.3g} |")


if __name__ == "__main__":
    main()
