"""Rank functions for the attention tests (run on spawned gloo ranks by `run_ranks`).

Every rank builds the same full q/k/v from a seed, computes plain attention on the whole
sequence as the reference, runs `parallel_attention` on its own shard and returns the
max error of its shard against the matching rows of the reference.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from comfy_para_attn.attention import (
    ContextParallelConfig,
    build_parallel_context,
    parallel_attention,
    shard_lengths,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# What a ring's compiled code does, in order: issue the K/V transfer, wait for it, run a kernel.
RING_ISSUE, RING_WAIT, RING_KERNEL = ("all_to_all_single.default(", "wait_tensor.default(",
                                      "_scaled_dot_product_flash_attention_for_cpu.default(")


def shard_failures(per_rank: list) -> list[str]:
    """The cases of `check_parallel_attention` results (one dict per rank) over TOLERANCE."""
    failures = []
    for rank, errors in enumerate(per_rank):
        for case, err in errors.items():
            tol = TOLERANCE[torch.float32] if case.startswith("float32") else TOLERANCE[torch.bfloat16]
            if not err < tol:
                failures.append(f"rank {rank} {case}: max abs err {err:.3g} >= {tol}")
    return failures


def ring_call_order(code: str) -> list[str]:
    """The RING_* calls in one piece of inductor's generated code, in order."""
    marks = (RING_ISSUE, RING_WAIT, RING_KERNEL)
    return [mark for line in code.splitlines() for mark in marks if mark in line]


def assert_transfer_overlaps_the_local_kernel(order: list[str]) -> None:
    """One transfer, issued before the local block's kernel, waited for before the other's."""
    assert order.count(RING_KERNEL) == 2 and order.count(RING_ISSUE) == 1, order
    assert order.index(RING_ISSUE) < order.index(RING_KERNEL) < order.index(RING_WAIT), order


def _reference(q, k, v, keep):
    """Plain attention in fp32 on the full sequence; keep: bool [B, S] or None."""
    mask = None if keep is None else keep[:, None, None, :]
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


def _joint_case(cp, dtype, masked, seed, heads=4, dim=16, batch=2, txt=7, img=19):
    """FLUX/HunyuanVideo-style joint attention: every rank holds a slice of the text
    tokens and a slice of the image tokens; padded text tokens are masked."""
    g = torch.Generator().manual_seed(seed)
    n = cp.config.sequence_size
    full = [torch.randn(batch, heads, txt + img, dim, generator=g).to(dtype) for _ in range(3)]
    keep = torch.ones(batch, txt + img, dtype=torch.bool)
    if masked:
        keep[0, 4:txt] = False  # batch 0 has 4 real text tokens, batch 1 all 7
    ref = _reference(*full, keep if masked else None)
    txt_idx = torch.tensor_split(torch.arange(txt), n)
    img_idx = torch.tensor_split(torch.arange(txt, txt + img), n)
    order = [torch.cat([t, i]) for t, i in zip(txt_idx, img_idx)]
    mine = order[cp.sequence_rank]
    seq_lens = [len(o) for o in order]
    global_keep = keep[:, torch.cat(order)]
    q, k, v = (x[:, :, mine] for x in full)
    return q, k, v, (global_keep if masked else None), seq_lens, ref[:, :, mine]


def _plain_case(cp, dtype, masked, uneven, seed, heads=4, dim=16, batch=2):
    g = torch.Generator().manual_seed(seed)
    n = cp.config.sequence_size
    total = 8 * n + (3 if uneven else 0)
    full = [torch.randn(batch, heads, total, dim, generator=g).to(dtype) for _ in range(3)]
    keep = torch.rand(batch, total, generator=g) > 0.3
    keep[:, 0] = True
    ref = _reference(*full, keep if masked else None)
    seq_lens = shard_lengths(total, n)
    start = sum(seq_lens[: cp.sequence_rank])
    rows = slice(start, start + seq_lens[cp.sequence_rank])
    q, k, v = (x[:, :, rows].contiguous() for x in full)
    return q, k, v, (keep if masked else None), seq_lens, ref[:, :, rows]


def check_parallel_attention(rank, world_size, ulysses, ring, compile_modes=(False, True), device="cpu"):
    """Return {case name: max abs error} for every dtype/mask/length/compile combination.
    `device` "cuda": the shards live on this rank's GPU (NCCL group, one GPU per rank)."""
    cp = build_parallel_context(ContextParallelConfig(ulysses=ulysses, ring=ring), num_heads=4)

    def attend(q, k, v, mask, seq_lens):
        return parallel_attention(q, k, v, mask=mask, cp=cp, seq_lens=seq_lens)

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True, dynamic=False)
    errors = {}
    cases = itertools.product((torch.float32, torch.bfloat16), (False, True), ("even", "uneven", "joint"), compile_modes)
    for seed, (dtype, masked, layout, use_compile) in enumerate(cases):
        if layout == "joint":
            q, k, v, mask, seq_lens, ref = _joint_case(cp, dtype, masked, seed)
        else:
            q, k, v, mask, seq_lens, ref = _plain_case(cp, dtype, masked, layout == "uneven", seed)
        q, k, v = (t.to(device) for t in (q, k, v))
        mask = None if mask is None else mask.to(device)
        if use_compile:
            torch._dynamo.reset()  # a fresh graph per shape; the test counts no recompiles
        fn = compiled if use_compile else attend
        out = fn(q, k, v, mask, seq_lens)
        name = f"{str(dtype).split('.')[-1]}-{'mask' if masked else 'nomask'}-{layout}-{'compiled' if use_compile else 'eager'}"
        if not torch.isfinite(out).all() or out.shape != ref.shape or out.dtype != dtype:
            errors[name] = float("inf")
        else:
            errors[name] = (out.float().cpu() - ref).abs().max().item()
    return errors


def count_graph_breaks(rank, world_size, ulysses, ring):
    """torch._dynamo.explain on a parallel_attention call: (graph count, break count)."""
    import torch._dynamo

    cp = build_parallel_context(ContextParallelConfig(ulysses=ulysses, ring=ring), num_heads=4)
    q, k, v = (torch.randn(1, 4, 8, 16) for _ in range(3))
    mask = torch.ones(1, 8 * world_size, dtype=torch.bool)

    def attend(q, k, v, mask):
        return parallel_attention(q, k, v, mask=mask, cp=cp)

    explanation = torch._dynamo.explain(attend)(q, k, v, mask)
    return explanation.graph_count, explanation.graph_break_count


def refused_shards(rank, world_size):
    """The ValueErrors of parallel_attention for a rank without tokens and for a mask of the
    wrong length (ring of `world_size`), raised before any collective."""
    cp = build_parallel_context(ContextParallelConfig(ring=world_size), num_heads=2)
    messages = []
    q = torch.randn(1, 2, 0 if rank == 0 else 4, 8)
    for seq_lens, mask in (([0] + [4] * (world_size - 1), None), (None, torch.ones(1, 3, dtype=torch.bool))):
        tokens = q if seq_lens else torch.randn(1, 2, 4, 8)
        try:
            parallel_attention(tokens, tokens, tokens, mask=mask, cp=cp, seq_lens=seq_lens)
            messages.append("")
        except ValueError as exc:
            messages.append(str(exc))
    return messages
