"""Why no 8-bit Q.K^T meets the issue's lse bar (1e-3): the error each way of quantizing the
scores puts on the log-sum-exp, emulated in fp32 torch on realistic inputs (CPU is enough).

    python bench/quantized_lse_error.py [--seq 4096] [--heads 4]

Each recipe quantizes Q and K the stated way, computes exact softmax statistics from the
dequantized scores and compares (out, lse) with the fp32 reference on the same bf16 inputs.
The lse error is split into its mean over rows (a bias a correction could remove) and its
spread: the spread is the scores' own rounding noise, which no epilogue can take back.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from comfy_para_attn.kernels.reference import (  # noqa: E402
    QUANTIZED_BAR, attention_reference, compare, quantized_attention_reference, realistic_inputs,
)


def int8_steps(x, group: int):
    """Steps (max |x| / 127) per row of x [B, H, S, D] (`group` 1) or per `group` rows."""
    if group == 1:
        return x.abs().amax(-1, keepdim=True).clamp_min(1e-20) / 127
    blocks = torch.stack([x[:, :, i:i + group].abs().amax(dim=(2, 3)) for i in range(0, x.shape[2], group)], -1)
    return (blocks.clamp_min(1e-20) / 127).repeat_interleave(group, -1)[..., : x.shape[2], None]


def round_int8(x, step):
    return (x / step).round().clamp(-127, 127) * step


def scores_int8(q, k, key_group: int):
    """int8 Q per token, K smoothed (mean key removed: softmax ignores it, lse adds it back)
    and int8 per `key_group` keys."""
    k_mean = k.mean(2, keepdim=True)
    k_smooth = k - k_mean
    q_hat = round_int8(q, int8_steps(q, 1))
    k_hat = round_int8(k_smooth, int8_steps(k_smooth, key_group))
    return q_hat @ k_hat.transpose(-1, -2) + q @ k_mean.transpose(-1, -2)


def scores_e4m3(q, k):
    """e4m3 Q and K with one scale per head (the fp8 attention of cuDNN / FA3)."""
    def fp8(x):
        scale = x.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-20) / 448
        return (x / scale).to(torch.float8_e4m3fn).float() * scale
    return fp8(q) @ fp8(k).transpose(-1, -2)


def stats_from_scores(scores, v):
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    shape = (1, args.heads, args.seq, 128)
    q, k, v = realistic_inputs(shape, torch.bfloat16, seed=args.seed)
    qf, kf, vf = q.float(), k.float(), v.float()
    scale = 1.0 / math.sqrt(shape[-1])
    ref_out, ref_lse = attention_reference(q, k, v)
    recipes = {
        "int8 Q/token, K/128 keys (ours, exact emulation incl. fp8 P.V)": lambda: quantized_attention_reference(q, k, v),
        "int8 Q/token, K/128 keys, scores only": lambda: stats_from_scores(scores_int8(qf, kf, 128) * scale, vf),
        "int8 Q/token, K/token, scores only": lambda: stats_from_scores(scores_int8(qf, kf, 1) * scale, vf),
        "e4m3 Q, K per head (cuDNN / FA3 fp8), scores only": lambda: stats_from_scores(scores_e4m3(qf, kf) * scale, vf),
        "bf16 Q.K^T, fp32 accumulation (the bf16 kernel)": lambda: stats_from_scores((qf @ kf.transpose(-1, -2)) * scale, vf),
    }
    print(f"torch {torch.__version__}, realistic inputs {list(shape)} bf16, seed {args.seed}; "
          f"bar: lse within {QUANTIZED_BAR['lse_abs']}")
    print(f"{'recipe':<66} {'cosine':>9} {'rel L2':>8} {'lse max':>8} {'mean':>9} {'std':>8}")
    for name, run in recipes.items():
        out, lse = run()
        metrics = compare(out, lse, ref_out, ref_lse)
        error = (lse.double() - ref_lse.double())
        assert torch.isfinite(error).all()
        print(f"{name:<66} {metrics['cosine']:>9.6f} {metrics['rel_l2']:>8.2e} {metrics['lse_abs']:>8.4f} "
              f"{error.mean().item():>+9.1e} {error.std().item():>8.4f}")


if __name__ == "__main__":
    main()
