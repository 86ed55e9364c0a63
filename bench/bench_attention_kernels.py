"""Attention kernels on one GPU: cuDNN and flash SDPA vs the Triton kernels, in one run.

    python bench/bench_attention_kernels.py [--shapes flux,hv33k,hv67k] [--dtype bf16] [--mask]

Prints device and versions, then per shape: ms, TFLOP/s, speed vs cuDNN, and accuracy
against an fp32 reference on a sample of query rows (rel L2, cosine, max lse error) with the
issue's bar. Inputs are realistically scaled (see kernels.reference.realistic_inputs).
Needs only torch + triton and this repository; `--backends ...,cudnn-fp8,cudnn-fp8-kernel` adds
cuDNN's own fp8 attention as a baseline (needs nvidia-cudnn-frontend; see cudnn_fp8_baseline.py).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from comfy_para_attn import kernels  # noqa: E402
from comfy_para_attn.attention import local  # noqa: E402
from comfy_para_attn.kernels.reference import FLASH_BAR, QUANTIZED_BAR, compare, meets_bar, padding_bias, realistic_inputs  # noqa: E402
from comfy_para_attn.kernels.selection import time_ms  # noqa: E402

SHAPES = {  # [B, H, S, D]
    "flux": (1, 24, 4608, 128),  # FLUX 1024x1024: 4096 image + 512 text tokens
    "hv33k": (1, 24, 33660, 128),  # HunyuanVideo 544p x 129 frames, half the tokens (one of 2 ranks)
    "hv67k": (1, 24, 67320, 128),  # HunyuanVideo 544p x 129 frames, whole
}
SAMPLE_ROWS = 1024  # query rows checked against the fp32 reference (all keys)


def refuse_fallback(*_):
    raise RuntimeError("fell back to SDPA (reason logged above)")


def backends(names):
    if any(name.startswith("cudnn-fp8") for name in names):
        from cudnn_fp8_baseline import baselines

        extra = baselines()
    else:
        extra = {}
    return {
        "sdpa-cudnn": local._BACKENDS["sdpa-cudnn"],
        "sdpa-flash": local._BACKENDS["sdpa-flash"],
        "sdpa-efficient": local._BACKENDS["sdpa-efficient"],
        "triton": functools.partial(kernels.flash_attention, fallback=refuse_fallback),
        "triton-fp8": functools.partial(kernels.quantized_attention, fallback=refuse_fallback),
        **extra,
    }


def sampled_reference(q, k, v, bias, rows):
    """fp32 (out, lse) for the query rows `rows`, all keys, one head at a time."""
    outs, lses = [], []
    scale = q.shape[-1] ** -0.5
    for h in range(q.shape[1]):
        scores = (q[:, h, rows].float() @ k[:, h].float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias[:, 0].float()
        lses.append(torch.logsumexp(scores, -1))
        outs.append(torch.softmax(scores, -1) @ v[:, h].float())
        del scores
    return torch.stack(outs, 1), torch.stack(lses, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="flux,hv33k,hv67k")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--mask", action="store_true", help="add a key padding bias (last 5%% of keys masked)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--backends", default="sdpa-cudnn,sdpa-flash,triton,triton-fp8")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    import triton

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    device = torch.device("cuda")
    cap = torch.cuda.get_device_capability()
    print(f"device: {torch.cuda.get_device_name()} (sm{cap[0]}{cap[1]}), torch {torch.__version__}, "
          f"triton {triton.__version__}, cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
    print(f"dtype {args.dtype}, mask {args.mask}, mean of {args.iters} back-to-back runs after warmup (incl. autotune); "
          f"accuracy on {SAMPLE_ROWS} sampled query rows vs fp32")
    bar_text = (f"bar: bf16 rel_l2<={FLASH_BAR['rel_l2']} lse<={FLASH_BAR['lse_abs']}; quantized "
                f"cos>={QUANTIZED_BAR['cosine']} rel_l2<={QUANTIZED_BAR['rel_l2']} lse<={QUANTIZED_BAR['lse_abs']}")
    print(bar_text)
    names = args.backends.split(",")
    chosen = {name: fn for name, fn in backends(names).items() if name in names}
    header = f"{'shape':>22} {'backend':>14} {'ms':>9} {'TFLOP/s':>8} {'vs cudnn':>8} {'rel_l2':>9} {'cosine':>9} {'lse_err':>9} {'bar':>5}"
    print(header)
    print("-" * len(header))
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        batch, heads, seq, head_dim = shape
        q, k, v = realistic_inputs(shape, dtype, device=device, seed=0)
        bias = padding_bias(batch, seq, seq - seq // 20, dtype, device) if args.mask else None
        rows = torch.randperm(seq, device=device)[:SAMPLE_ROWS].sort().values
        ref_out, ref_lse = sampled_reference(q, k, v, bias, rows)
        flops = 4.0 * batch * heads * seq * seq * head_dim
        cudnn_ms = None
        for name, fn in chosen.items():
            label = f"{shape_name} {list(shape)}"
            try:
                out, lse = fn(q, k, v, bias, None)
                ms = time_ms(fn, q, k, v, bias, None, iters=args.iters)
            except Exception as exc:
                print(f"{label:>22} {name:>14}  failed: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            if name == "sdpa-cudnn":
                cudnn_ms = ms
            ratio = f"{cudnn_ms / ms:7.2f}x" if cudnn_ms else "      -"
            timing = f"{label:>22} {name:>14} {ms:9.3f} {flops / ms / 1e9:8.1f} {ratio:>8}"
            if name.endswith("-kernel"):  # fp8 output of the kernel alone: accuracy is the row above's
                print(f"{timing} {'(as above, before dequantization)':>40}")
                continue
            metrics = compare(out[:, :, rows], lse[:, :, rows], ref_out, ref_lse)
            bar = QUANTIZED_BAR if "fp8" in name else FLASH_BAR
            print(f"{timing} {metrics['rel_l2']:9.2e} "
                  f"{metrics['cosine']:9.6f} {metrics['lse_abs']:9.2e} {'ok' if meets_bar(metrics, bar) else 'MISS':>5}")
            del out, lse
        del q, k, v
        torch.cuda.empty_cache()
    print("targets: triton within 10% of cudnn (vs cudnn >= 0.90x); triton-fp8 >= 1.5x cudnn at 33k+ tokens")


if __name__ == "__main__":
    main()
