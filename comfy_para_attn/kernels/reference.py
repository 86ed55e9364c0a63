"""Pure-torch references, test inputs and the accuracy bar shared by tests, bench and `auto`."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._runtime import math_attention

# The bar, against an fp32 reference computed from the same (rounded) inputs.
FLASH_BAR = {"rel_l2": 1e-2, "lse_abs": 1e-3}
QUANTIZED_BAR = {"rel_l2": 5e-2, "cosine": 0.999, "lse_abs": 1e-3}


def attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None, scale: Optional[float] = None):
    """fp32 (out, lse): what every kernel is measured against."""
    out, lse = math_attention(q.float(), k.float(), v.float(), None if bias is None else bias.float(), scale)
    return out, lse


def quantized_attention_reference(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor] = None,
                                  scale: Optional[float] = None, key_block: int = 128):
    """The quantized kernel's arithmetic written in torch (one block, no online softmax):
    K smoothing, int8 Q per token and K per block of `key_block` keys, per-channel fp8 V,
    fp8 P scaled by 448."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf = q.float(), k.float(), v.float()
    k_mean = kf.mean(dim=2, keepdim=True)
    k_smooth = kf - k_mean

    def int8(x, step):
        scaled = x / step
        return (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).clamp(-127, 127), step  # half away, as the kernel

    q_int, q_step = int8(qf, qf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-20) / 127)
    seq_k = k.shape[2]
    block_max = torch.stack([k_smooth[:, :, i:i + key_block].abs().amax(dim=(2, 3)) for i in range(0, seq_k, key_block)], -1)
    k_step = (block_max.clamp_min(1e-20) / 127).repeat_interleave(key_block, dim=-1)[..., :seq_k, None]
    k_int, k_step = int8(k_smooth, k_step)
    scores = (q_int @ k_int.transpose(-1, -2)) * q_step * k_step.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.float()
    row_max = scores.amax(dim=-1, keepdim=True)
    p = torch.exp(scores - row_max)
    row_sum = p.sum(dim=-1, keepdim=True)
    p8 = (p * 448).to(torch.float8_e4m3fn).float()
    v_scale = vf.abs().amax(dim=2, keepdim=True).clamp_min(1e-20) / 448
    v8 = (vf / v_scale).to(torch.float8_e4m3fn).float()
    out = (p8 @ v8) * v_scale / (448 * row_sum)
    lse = (row_max + torch.log(row_sum)).squeeze(-1) + scale * (qf @ k_mean.transpose(-1, -2)).squeeze(-1)
    return out.to(q.dtype), lse


def compare(out: Tensor, lse: Tensor, ref_out: Tensor, ref_lse: Tensor) -> dict:
    """rel_l2 and cosine of the outputs, max |lse - ref_lse|."""
    o, r = out.double().flatten(), ref_out.double().flatten()
    rel_l2 = (torch.linalg.vector_norm(o - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)).item()
    cosine = (torch.dot(o, r) / (torch.linalg.vector_norm(o) * torch.linalg.vector_norm(r)).clamp_min(1e-30)).item()
    lse_abs = (lse.double() - ref_lse.double()).abs().max().item()
    return {"rel_l2": rel_l2, "cosine": cosine, "lse_abs": lse_abs}


def meets_bar(metrics: dict, bar: dict) -> bool:
    ok = metrics["rel_l2"] <= bar["rel_l2"] and metrics["lse_abs"] <= bar["lse_abs"]
    return ok and metrics["cosine"] >= bar.get("cosine", -1.0)


def random_inputs(shape, dtype, device="cpu", seed=0):
    """Unit normal q, k, v: the easy case (diffuse attention)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, device=device).to(dtype) for _ in range(3))


def realistic_inputs(shape, dtype, device="cpu", seed=0, clusters=8):
    """q, k, v shaped like DiT activations rather than noise: per-channel scales with a few
    outlier channels, a shared key offset (what K smoothing removes), per-token magnitude,
    and token clusters that make attention peaked: logit std ~3, ~30 keys carry a row's weight,
    not the near-uniform rows that unit-normal inputs give."""
    batch, heads, seq, dim = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, device=device)

    channel_scale = torch.exp(0.3 * randn(1, heads, 1, dim))
    channel_scale[..., : max(1, dim // 32)] *= 2.5  # outlier channels
    key_offset = 1.5 * randn(1, heads, 1, dim)
    centers = 0.6 * randn(1, heads, clusters, dim)
    cluster_of = torch.randint(0, clusters, (seq,), generator=g, device=device)
    shared = centers[:, :, cluster_of]  # [1, H, S, D]
    token_scale = torch.exp(0.25 * randn(batch, heads, seq, 1))
    q = (randn(batch, heads, seq, dim) + shared) * channel_scale * token_scale
    k = (randn(batch, heads, seq, dim) + shared) * channel_scale + key_offset
    v = randn(batch, heads, seq, dim) * torch.exp(0.5 * randn(1, heads, 1, dim)) + randn(1, heads, 1, dim)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_bias(batch: int, seq_k: int, keep: int, dtype, device="cpu"):
    """Additive key bias [B, 1, 1, S]: the last `seq_k - keep` keys are padding (as padded
    text tokens are), with the same large finite negative value the attention layer uses."""
    bias = torch.zeros(batch, 1, 1, seq_k, dtype=dtype, device=device)
    bias[..., keep:] = -0.5 * torch.finfo(dtype).max
    return bias
