"""Where does the Triton flash kernel lose to cuDNN? Times, on one GPU and in one run:

- cuDNN SDPA and `kernels.flash_attention`, each per call with a sync (what
  `kernels.selection.time_ms` measured: host overhead included) and back to back
  (steady state, as inside a model);
- the raw kernel under each block/warp/stage configuration;
- a TMA-descriptor variant (`tl.range(..., warp_specialize=...)` where triton has it).

    python bench/sweep_flash_configs.py [--seqs 4608,33792] [--quantized]

`--quantized` sweeps the quantized kernel instead: its whole call, the raw kernel (pre-pass
done once) under each configuration its autotuner tries, and the configuration it picked.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from comfy_para_attn import kernels  # noqa: E402
from comfy_para_attn.attention import local  # noqa: E402
from comfy_para_attn.kernels.reference import realistic_inputs  # noqa: E402
from comfy_para_attn.kernels.triton_flash import LOG2E, flash_attention_kernel, flops  # noqa: E402


def synced_ms(fn, iters=10):
    fn()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end)
    return total / iters


def back_to_back_ms(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


@triton.jit
def _tma_attention(desc_q, desc_k, desc_v, desc_o, Lse, seq, qk_scale_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    row0 = batch_head * seq + block_m * BLOCK_M
    q = desc_q.load([row0, 0])
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    key0 = batch_head * seq
    for start_n in tl.range(0, seq, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = desc_k.load([key0 + start_n, 0]).T
        qk = tl.dot(q, k)
        new_max = tl.maximum(row_max, tl.max(qk, 1) * qk_scale_log2)
        p = tl.math.exp2(qk * qk_scale_log2 - new_max[:, None])
        rescale = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None]
        v = desc_v.load([key0 + start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        row_max = new_max
    desc_o.store([row0, 0], (acc / row_sum[:, None]).to(desc_o.dtype))
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(Lse + batch_head * seq + offs_m, (row_max + tl.math.log2(row_sum)) * 0.6931471805599453)


def tma_runner(q, k, v, block_m, block_n, warps, stages, ws):
    from triton.tools.tensor_descriptor import TensorDescriptor

    batch, heads, seq, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    flat = [t.reshape(-1, dim) for t in (q, k, v, out)]
    desc_q = TensorDescriptor.from_tensor(flat[0], [block_m, dim])
    desc_k = TensorDescriptor.from_tensor(flat[1], [block_n, dim])
    desc_v = TensorDescriptor.from_tensor(flat[2], [block_n, dim])
    desc_o = TensorDescriptor.from_tensor(flat[3], [block_m, dim])
    grid = (seq // block_m, batch * heads)
    scale = dim ** -0.5 * LOG2E

    def run():
        _tma_attention[grid](desc_q, desc_k, desc_v, desc_o, lse, seq, scale, HEAD_DIM=dim, BLOCK_M=block_m,
                             BLOCK_N=block_n, WARP_SPECIALIZE=ws, num_warps=warps, num_stages=stages)
        return out, lse
    return run


def raw_runner(q, k, v, block_m, block_n, warps, stages):
    batch, heads, seq, dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(seq, block_m), batch * heads)
    args = (q, k, v, lse, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], 0, 0,
            heads, seq, seq, dim ** -0.5 * LOG2E, 0)

    def run():
        flash_attention_kernel[grid](*args, HEAD_DIM=dim, HAS_BIAS=False, UPCAST_DOT=False, BLOCK_M=block_m,
                                     BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        return out, lse
    return run


def quantized_raw_runner(q, k, v, config):
    from comfy_para_attn.kernels import triton_quantized as tq

    batch, heads, seq, dim = q.shape
    q8, q_scale, k8, k_scale, vt8, v_scale, lse_offset = tq.quantize_inputs(q, k, v, dim ** -0.5)
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    block_m = config.kwargs["BLOCK_M"]
    grid = (triton.cdiv(seq, block_m), batch * heads)
    args = (q8, q_scale, k8, k_scale, vt8, v_scale, lse_offset, lse, out, lse, *out.stride()[:3], 0, 0,
            heads, seq, seq, vt8.shape[-1], 0)

    def run():
        tq.quantized_attention_kernel[grid](*args, HEAD_DIM=dim, HAS_BIAS=False, EMULATE_FP8=False, **config.kwargs,
                                            num_warps=config.num_warps, num_stages=config.num_stages)
        return out, lse
    return run


def sweep_quantized(seq, q, k, v, report):
    from comfy_para_attn.kernels import triton_quantized as tq

    whole = lambda: kernels.quantized_attention(q, k, v)  # noqa: E731
    report("kernels.quantized_attention back-to-back", back_to_back_ms(whole), whole()[0])
    hopper = torch.cuda.get_device_capability()[0] == 9
    print(f"S={seq} autotuner's pick: {tq._autotuned(hopper).best_config}", flush=True)
    for config in tq._GPU_CONFIGS:
        c = config.kwargs
        name = f"raw quantized BM{c['BLOCK_M']} BN{c['BLOCK_N']} w{config.num_warps} s{config.num_stages}"
        try:
            run = quantized_raw_runner(q, k, v, config)
            report(name, back_to_back_ms(run), run()[0])
        except Exception as exc:  # out of shared memory / registers
            print(f"S={seq} {name}: {type(exc).__name__}: {str(exc)[:120]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", default="4608,33792")
    parser.add_argument("--quantized", action="store_true", help="sweep the quantized kernel instead")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    for seq in map(int, args.seqs.split(",")):
        q, k, v = realistic_inputs((1, 24, seq, 128), torch.bfloat16, device="cuda", seed=1)
        tflop = flops(1, 24, seq, seq, 128) / 1e12
        cudnn = local._BACKENDS["sdpa-cudnn"]
        ref = cudnn(q, k, v, None, None)[0].float()
        base = back_to_back_ms(lambda: cudnn(q, k, v, None, None))

        def report(name, ms, out=None):
            err = float("nan") if out is None else ((out.float() - ref).norm() / ref.norm()).item()
            rows.append((seq, name, ms, tflop / ms * 1e3, base / ms, err))
            print(f"S={seq:6d} {name:44s} {ms:8.3f} ms {tflop / ms * 1e3:6.0f} TFLOP/s {base / ms:5.2f}x cuDNN  "
                  f"rel L2 vs cuDNN {err:.2e}", flush=True)

        report("cuDNN back-to-back", base)
        report("cuDNN synced per call", synced_ms(lambda: cudnn(q, k, v, None, None)))
        if args.quantized:
            sweep_quantized(seq, q, k, v, report)
            continue
        ours = lambda: kernels.flash_attention(q, k, v)  # noqa: E731
        report("kernels.flash_attention back-to-back", back_to_back_ms(ours), ours()[0])
        report("kernels.flash_attention synced per call", synced_ms(ours))
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4),
                             (128, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4), (256, 64, 8, 3)]:
            try:
                run = raw_runner(q, k, v, bm, bn, w, s)
                report(f"raw BM{bm} BN{bn} w{w} s{s}", back_to_back_ms(run), run()[0])
            except Exception as exc:  # out of shared memory / registers
                print(f"S={seq} raw BM{bm} BN{bn} w{w} s{s}: {type(exc).__name__}: {str(exc)[:120]}")
        for bm, bn, w, s, ws in [(128, 128, 8, 2, False), (128, 128, 8, 3, False), (128, 64, 8, 3, False),
                                 (128, 128, 4, 3, False), (128, 128, 4, 2, True), (128, 128, 8, 2, True),
                                 (128, 64, 4, 3, True), (128, 128, 4, 3, True)]:
            try:
                run = tma_runner(q, k, v, bm, bn, w, s, ws)
                report(f"TMA BM{bm} BN{bn} w{w} s{s} ws{int(ws)}", back_to_back_ms(run), run()[0])
            except Exception as exc:
                print(f"S={seq} TMA BM{bm} BN{bn} w{w} s{s} ws{int(ws)}: {type(exc).__name__}: {str(exc)[:160]}")
    print("\n| S | kernel | ms | TFLOP/s | vs cuDNN |\n|---|---|---|---|---|")
    for seq, name, ms, tf, ratio, _ in rows:
        print(f"| {seq} | {name} | {ms:.3f} | {tf:.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
