"""Context Parallel inside FLUX / HunyuanVideo single-stream blocks: the exchange travels
under the MLP GEMMs.

ComfyUI's `SingleStreamBlock` (38 of FLUX.1's 57 blocks, 40 of HunyuanVideo's 60) makes q, k,
v and the MLP input with one GEMM (`linear1`), attends, then runs one GEMM over
[attention, GELU(mlp)] (`linear2`). The MLP half never depends on attention, so in the pool
workers these blocks run with both GEMMs split at the attention/MLP boundary (row and
column views of the same weights, no copy):

    modulated x -> q/k/v GEMM -> norms, rope -> exchange starts     (PhasedAttention)
                -> MLP input GEMM, GELU                              under the exchange
                -> attention kernel -> output starts back (Ulysses)
                -> MLP output GEMM                                   under the way back
                -> attention-output GEMM added in, gated residual

Without it the exchange waited in front of the attention kernel: on 2 GPUs with NVLink it
is ~10% of a sharded FLUX step. It is an object patch of each block's `forward` in the
workers' clones (the class and the ComfyUI process are untouched), and it runs the block's
own forward whenever it cannot help: tokens not sharded, weights cast or patched per call
(low-VRAM mode, fp8 storage), quantized weight tensors, token-wise modulation.
`PARA_ATTN_OVERLAP=0` turns it off (for benchmarks).
"""
from __future__ import annotations

import os
import types

import torch
import torch.nn.functional as F

from ...attention.phased import PhasedAttention
from .sequence_parallel import ContextParallelAttention

ENABLED = os.environ.get("PARA_ATTN_OVERLAP", "1") != "0"


def _plain_linear(linear, dtype) -> bool:
    """Weights used as they are stored: no per-call cast or patch function, no subclass."""
    weight, bias = linear.weight, linear.bias
    return (not getattr(linear, "comfy_cast_weights", False) and not getattr(linear, "weight_function", None)
            and not getattr(linear, "bias_function", None)
            and type(weight) in (torch.nn.Parameter, torch.Tensor) and weight.dtype == dtype
            and bias is not None and type(bias) in (torch.nn.Parameter, torch.Tensor))


def overlapped_single_block_forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
    """`SingleStreamBlock.forward` with the split GEMMs around a `PhasedAttention`."""
    from comfy.ldm.flux.layers import apply_mod
    from comfy.ldm.flux.math import apply_rope

    override = transformer_options.get("optimized_attention_override")
    call = override.call if isinstance(override, ContextParallelAttention) else None
    if (call is None or not call.active or call.seq_lens[call.rank] != x.shape[1] or modulation_dims is not None
            or not _plain_linear(self.linear1, x.dtype) or not _plain_linear(self.linear2, x.dtype)):
        return type(self).forward(self, x, vec, pe, attn_mask, modulation_dims, transformer_options)
    width = 3 * self.hidden_size  # linear1's q/k/v rows; linear2's attention columns: hidden_size
    w1, b1, w2, b2 = self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias

    mod, _ = self.modulation(vec)
    x_mod = apply_mod(self.pre_norm(x), 1 + mod.scale, mod.shift, None)
    qkv = F.linear(x_mod, w1[:width], b1[:width])
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = self.norm(q, k, v)
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    attention = PhasedAttention(q, k, v, cp=call.cp, mask=call.key_mask, seq_lens=call.seq_lens)
    mlp = self.mlp_act(F.linear(x_mod, w1[width:], b1[width:]))
    attention.attend()
    output = F.linear(mlp, w2[:, self.hidden_size:], b2)
    attn = attention.result().transpose(1, 2).reshape(-1, self.hidden_size)
    output = torch.addmm(output.view(-1, output.shape[-1]), attn, w2[:, : self.hidden_size].t()).view(output.shape)
    x += apply_mod(output, mod.gate, None, None)
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def install_overlapped_blocks(patcher) -> int:
    """Object-patch the forward of every `SingleStreamBlock` of `patcher`'s model; returns
    how many blocks were patched (0 when disabled or the model has none)."""
    if not ENABLED:
        return 0
    from comfy.ldm.flux.layers import SingleStreamBlock

    blocks = getattr(patcher.model.diffusion_model, "single_blocks", None) or []
    patched = 0
    for i, block in enumerate(blocks):
        if type(block) is SingleStreamBlock:
            patcher.add_object_patch(f"diffusion_model.single_blocks.{i}.forward",
                                     types.MethodType(overlapped_single_block_forward, block))
            patched += 1
    return patched
