"""Context-parallel attention vs plain SDPA on real spawned gloo ranks (unit tier, CPU)."""
import pytest
import torch

from comfy_para_attn.attention import ContextParallelConfig, local_attention, parallel_attention
from comfy_para_attn.testing.attention_checks import (
    assert_transfer_overlaps_the_local_kernel,
    check_parallel_attention,
    count_graph_breaks,
    ring_call_order,
    shard_failures,
)
from comfy_para_attn.testing.distributed import run_ranks

LAYOUTS = [  # (world, ulysses, ring)
    pytest.param(1, 1, 1, id="world1"),
    pytest.param(2, 2, 1, id="ulysses2"),
    pytest.param(2, 1, 2, id="ring2"),
    pytest.param(4, 1, 4, id="ring4"),
    pytest.param(4, 2, 2, id="ulysses2xring2"),
]


@pytest.mark.parametrize("world,ulysses,ring", LAYOUTS)
def test_shards_match_full_attention(world, ulysses, ring):
    per_rank = run_ranks(check_parallel_attention, world, ulysses, ring)
    assert len(per_rank[0]) == 24  # 2 dtypes x 2 masks x 3 layouts x eager/compiled
    failures = shard_failures(per_rank)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world,ulysses,ring", [(2, 2, 1), (4, 2, 2)])
def test_pipelined_ulysses_matches_full_attention(world, ulysses, ring, monkeypatch):
    """Ulysses pipelined over 2 head chunks (opt-in) gives the same shards."""
    monkeypatch.setenv("PARA_ATTN_ULYSSES_CHUNKS", "2")  # read by each spawned rank at import
    failures = shard_failures(run_ranks(check_parallel_attention, world, ulysses, ring, (False,)))
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world,ulysses,ring", [(2, 1, 2), (4, 2, 2)])
def test_overlapping_ring_of_two_matches_full_attention(world, ulysses, ring, monkeypatch):
    """A ring of two fetches the other block and runs one kernel when blocks are short (every
    case above); with the threshold at 0 it overlaps and merges by log-sum-exp instead."""
    monkeypatch.setenv("PARA_ATTN_RING_GATHER_TOKENS", "0")  # read by each spawned rank at import
    per_rank = run_ranks(check_parallel_attention, world, ulysses, ring)
    assert all(len(errors) == 24 for errors in per_rank)
    failures = shard_failures(per_rank)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world,ulysses,ring", [(2, 1, 2), (4, 2, 2)])
def test_ring_of_two_gathering_head_groups_matches_full_attention(world, ulysses, ring, monkeypatch):
    """The gather pipelined over head groups (3 of 4 heads: groups of 2, 1, 1; under ulysses 2
    each rank has 2 heads left, so 2 groups) gives the same shards, uneven lengths included."""
    monkeypatch.setenv("PARA_ATTN_RING_FETCH_CHUNKS", "3")  # read by each spawned rank at import
    per_rank = run_ranks(check_parallel_attention, world, ulysses, ring)
    assert all(len(errors) == 24 for errors in per_rank)
    failures = shard_failures(per_rank)
    assert not failures, "\n".join(failures)


def test_head_groups_cover_every_head_once():
    from comfy_para_attn.attention.ring import head_groups

    assert head_groups(24, 1) == [(0, 24)]
    assert head_groups(24, 4) == [(0, 6), (6, 12), (12, 18), (18, 24)]
    assert head_groups(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert head_groups(2, 3) == [(0, 1), (1, 2)]


def test_tuning_knobs_fall_back_to_their_default_on_bad_values(monkeypatch, caplog):
    from comfy_para_attn.attention.config import env_int

    for value, expected in (("3", 3), ("", 1), ("two", 1), ("0", 1)):
        monkeypatch.setenv("PARA_ATTN_TEST_KNOB", value)
        assert env_int("PARA_ATTN_TEST_KNOB", 1, minimum=1) == expected
    assert "PARA_ATTN_TEST_KNOB='two' is not an integer >= 1; using 1" in caplog.text


def kernel_calls_of_a_ring_of_two(rank, world_size, tokens):
    """(local kernel calls, max abs error) of one ring-of-two call with `tokens` keys a rank."""
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context, ring as ring_module

    cp = build_parallel_context(ContextParallelConfig(ring=2), num_heads=2)
    calls = []
    plain = ring_module.local_attention
    ring_module.local_attention = lambda *a, **kw: calls.append(a[1].shape[2]) or plain(*a, **kw)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 2 * tokens, 8, generator=g) for _ in range(3))
    mine = slice(rank * tokens, (rank + 1) * tokens)
    out = parallel_attention(q[:, :, mine], k[:, :, mine], v[:, :, mine], cp=cp)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, :, mine]
    return calls, (out - ref).abs().max().item()


def test_a_ring_of_two_fetches_short_blocks_and_overlaps_long_ones(monkeypatch):
    monkeypatch.setenv("PARA_ATTN_RING_GATHER_TOKENS", "16")
    for tokens, keys_per_call in ((16, [32]), (17, [17, 17])):
        for calls, err in run_ranks(kernel_calls_of_a_ring_of_two, 2, tokens):
            assert calls == keys_per_call and err < 1e-5


def compiled_ring_call_order(rank, world_size):
    """Rank 0's inductor code for a block-like function around ring attention: the lines that
    issue the transfer, wait for it and launch the attention kernels, in order."""
    from torch._inductor.utils import run_and_get_code

    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context

    cp = build_parallel_context(ContextParallelConfig(ring=2), num_heads=4)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g) for _ in range(3))
    proj = torch.randn(128, 128, generator=g)

    def block(q, k, v):
        out = parallel_attention(q * 1.5, k + 1.0, v * 2.0, cp=cp)
        return out.transpose(1, 2).reshape(1, 64, 128) @ proj

    compiled = torch.compile(block, fullgraph=True)
    _, (code, *_) = run_and_get_code(compiled, q, k, v)
    return ring_call_order(code)


def test_compiled_ring_issues_the_transfer_before_the_local_kernel(monkeypatch):
    """In this function inductor's peak-memory reordering moved the transfer behind the local
    block's kernel (no overlap); building a parallel context turns it off in the process."""
    monkeypatch.setenv("PARA_ATTN_RING_GATHER_TOKENS", "0")  # the overlapping ring
    assert_transfer_overlaps_the_local_kernel(run_ranks(compiled_ring_call_order, 2)[0])


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)])
def test_compile_captures_without_graph_breaks(ulysses, ring):
    for graphs, breaks in run_ranks(count_graph_breaks, 2, ulysses, ring):
        assert (graphs, breaks) == (1, 0)


def test_local_kernel_returns_lse():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    out, lse = local_attention(q, k, v)
    scores = q @ k.transpose(-1, -2) / 8**0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sdpa_takes_odd_head_dims_and_the_flash_name_keeps_the_bias():
    """cuDNN and the efficient kernel refuse bf16 head dims that are not multiples of 8
    (called directly, without PyTorch's checks): those go the plain way. The flash kernel has
    no bias input: a bias sends it to the efficient kernel instead of being dropped."""
    from comfy_para_attn.kernels._runtime import math_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    for dim, backend in ((100, "sdpa"), (128, "sdpa-flash")):
        q, k, v = (torch.randn(1, 4, 256, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        bias = torch.zeros(1, 1, 1, 256, device="cuda", dtype=q.dtype)  # as key_padding_bias makes it
        bias[..., 128:] = torch.finfo(q.dtype).min / 2
        for b in (None, bias):
            out, lse = local_attention(q, k, v, b, backend=backend)
            ref, ref_lse = math_attention(q, k, v, b)
            assert torch.isfinite(out).all() and ref.abs().mean() > 0.01
            assert (out.float() - ref.float()).abs().max().item() < 2e-2, (dim, backend, b is None)
            assert (lse - ref_lse).abs().max().item() < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_after_fully_masked_blocks_equals_attention_over_all_keys(dtype):
    """A ring of 4 whose first two key blocks are padding (lse ~ -1.7e38, the mask's bias):
    the merged result equals attention over all keys (the lse form that cancelled to 0 there
    weighted the later blocks wrongly: max err 1.2 on the rank holding the padding)."""
    from comfy_para_attn.attention.ring import merge_partial
    from comfy_para_attn.kernels._runtime import math_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, dtype=dtype) for _ in range(3))
    bias = torch.zeros(1, 1, 1, 32)
    bias[..., :16] = torch.finfo(torch.float32).min / 2  # two blocks of 8 keys, all padding
    keys = torch.cat([torch.randn(1, 2, 8, 16, dtype=dtype) for _ in range(3)] + [k], 2)
    values = torch.cat([torch.randn(1, 2, 8, 16, dtype=dtype) for _ in range(3)] + [v], 2)
    ref_out, ref_lse = math_attention(q, keys, values, bias)
    out = lse = None
    for block in range(4):
        cols = slice(8 * block, 8 * block + 8)
        block_out, block_lse = math_attention(q, keys[:, :, cols], values[:, :, cols], bias[..., cols])
        if out is None:
            out, lse = block_out.float(), block_lse
        else:
            out, lse = merge_partial(out, lse, block_out, block_lse)
    assert torch.isfinite(out).all() and ref_out.float().abs().mean() > 0.1
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out - ref_out.float()).abs().max().item() < tol
    assert (lse - ref_lse).abs().max().item() < 1e-4


def test_empty_shards_and_short_masks_are_refused_with_what_to_change():
    """A rank without tokens hung (ring of two, gathering) or failed deep inside; a mask that
    does not cover the whole sequence is named. Both before any collective, on every rank."""
    from comfy_para_attn.testing.attention_checks import refused_shards

    for empty, short_mask in run_ranks(refused_shards, 2):
        assert "every rank needs at least one token" in empty and "fewer ranks" in empty
        assert "mask covers 3 keys but the sequence has 8 tokens" in short_mask


def test_single_rank_is_plain_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    keep = torch.rand(1, 12, generator=g) > 0.5
    keep[:, 0] = True
    out = parallel_attention(q, k, v, mask=keep, cp=None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None])
    assert (out - ref).abs().max() < 1e-5
    # a tokenizer's 0/1 integer mask was read as a +0/+1 bias (nothing masked); torch refuses it too
    for dtype in (torch.int64, torch.uint8):
        with pytest.raises(TypeError, match="pass mask.bool()"):
            parallel_attention(q, k, v, mask=keep.to(dtype), cp=None)


@pytest.mark.parametrize(
    "config,kwargs,message",
    [
        (ContextParallelConfig(ulysses=2, ring=2), {"world_size": 2}, "does not match the 2 ranks"),
        (ContextParallelConfig(ulysses=3), {"world_size": 3, "num_heads": 4}, "does not divide the model's 4"),
        (ContextParallelConfig(cfg=3), {}, "set cfg to 1 or 2"),
        (ContextParallelConfig(ring=0), {}, "positive integer"),
    ],
)
def test_bad_layouts_say_what_to_change(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config.validate(**kwargs)


def test_auto_layout_ring_for_two_then_ulysses_within_heads():
    assert ContextParallelConfig.auto(2, num_heads=24) == ContextParallelConfig(ring=2)
    assert ContextParallelConfig.auto(4, num_heads=24, use_cfg=True) == ContextParallelConfig(ring=2, cfg=2)
    assert ContextParallelConfig.auto(4, num_heads=24) == ContextParallelConfig(ulysses=4)
    assert ContextParallelConfig.auto(8, num_heads=24) == ContextParallelConfig(ulysses=8)
    assert ContextParallelConfig.auto(8, num_heads=12) == ContextParallelConfig(ulysses=4, ring=2)
