"""ComfyUI sampling with context parallelism on 2 spawned gloo ranks equals plain sampling
(comfyui tier: real ComfyUI model classes and sampling code; tiny random weights, fp32)."""
import pytest
import torch

from comfy_para_attn.testing.comfy_cp_checks import sample_both
from comfy_para_attn.testing.distributed import run_ranks

TOL = 2e-4  # fp32; the parallel path sums attention blocks in a different order

CASES = [
    {"name": "euler-cfg1", "cfg": 1.0},
    {"name": "dpmpp2m-cfg3-denoise0.6", "sampler": "dpmpp_2m", "cfg": 3.0, "denoise": 0.6},
    {"name": "uneven-tokens", "tokens": 7, "latent": {"height": 6, "width": 10}},
]


def _assert_equals_plain(per_rank, cases):
    """Every rank reports every case, each equal to plain sampling within TOL (not degenerate)."""
    for rank, results in enumerate(per_rank):
        assert set(results) == {case["name"] for case in cases}
        for name, (err, scale) in results.items():
            assert scale > 1e-3, "degenerate output"
            assert err < TOL, f"rank {rank} {name}: max abs err {err:.3g}"


@pytest.mark.parametrize("family", ["flux", "hunyuan_video", "wan"])
@pytest.mark.parametrize("ulysses,ring,cfg", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["ulysses2", "ring2", "cfg2"])
def test_context_parallel_sampling_equals_plain(comfyui_path, family, ulysses, ring, cfg):
    cases = CASES if cfg == 1 else [{"name": "cfg-parallel", "cfg": 3.0}]
    _assert_equals_plain(run_ranks(sample_both, 2, str(comfyui_path), family, ulysses, ring, cfg, cases), cases)


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_hunyuan_video_image_to_video(comfyui_path, ulysses, ring):
    """HunyuanVideo image-to-video, and a padded prompt. "v2 (replace)" (guiding_frame_index) modulates the first
    frame's tokens with their own vector; with 3 latent frames the first frame ends inside
    rank 0's shard, so each rank needs the ranges moved to its own tokens. "custom" puts a
    reference frame's tokens in front of the image tokens."""
    latent = {"frames": 3, "height": 6, "width": 10}
    reference = torch.randn(1, 16, 1, 6, 10, generator=torch.Generator().manual_seed(4))
    text_mask = torch.ones(1, 7)
    text_mask[:, 5:] = 0  # the last 2 of 7 text tokens are padding
    cases = [{"name": "v2 (replace)", "cond": {"guiding_frame_index": 0}, "tokens": 7, "cfg": 1.0, "latent": latent},
             # a padded prompt: the key mask permuted to the shards' order
             {"name": "text mask", "cond": {"attention_mask": text_mask}, "tokens": 7, "cfg": 1.0, "latent": latent},
             # "custom": the reference frame's tokens go in front of the image tokens
             {"name": "custom (ref_latent)", "cond": {"ref_latent": reference}, "tokens": 7, "cfg": 1.0,
              "latent": latent}]
    _assert_equals_plain(run_ranks(sample_both, 2, str(comfyui_path), "hunyuan_video", ulysses, ring, 1, cases), cases)


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_wan22_per_frame_timesteps(comfyui_path, ulysses, ring):
    """Wan 2.2 (5B, 48-channel latents) image-to-video keeps the first latent frame: every
    frame gets its own timestep and its tokens their own modulation. A rank's slice of the
    tokens does not start at a frame boundary (3 frames of 15 tokens over 2 ranks)."""
    latent = {"frames": 3, "height": 6, "width": 10}
    cases = [{"name": "image-to-video", "keep_first_frame": True, "tokens": 7, "cfg": 3.0, "latent": latent},
             {"name": "text-to-video", "tokens": 7, "cfg": 3.0, "latent": latent},
             # one block: the sharding patch calls the gathering patch directly (it once gathered twice)
             {"name": "one block", "keep_first_frame": True, "tokens": 7, "cfg": 3.0, "latent": latent,
              "config": {"num_layers": 1}}]
    _assert_equals_plain(run_ranks(sample_both, 2, str(comfyui_path), "wan22", ulysses, ring, 1, cases), cases)


@pytest.mark.parametrize("ulysses,ring", [(2, 1), (1, 2)], ids=["ulysses2", "ring2"])
def test_wan_shards_as_long_as_the_text(comfyui_path, ulysses, ring):
    """Wan's cross-attention keys are the text: a shard of as many tokens as the prompt (a
    512-token prompt at 512x512 on 2 GPUs) was refused, its self-attention told from the
    cross-attention by key length. 2 frames of 16 tokens over 2 ranks, 16 text tokens; also
    with the blocks compiled whole (fullgraph), the order kept inside dynamo's trace."""
    cases = [{"name": "shard = text", "tokens": 16, "cfg": 3.0},
             {"name": "compiled blocks", "tokens": 16, "cfg": 3.0, "compile": "eager"}]
    _assert_equals_plain(run_ranks(sample_both, 2, str(comfyui_path), "wan", ulysses, ring, 1, cases), cases)


@pytest.mark.parametrize("ulysses,ring,cfg", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["ulysses2", "ring2", "cfg2"])
def test_flux_kontext_reference_latents(comfyui_path, ulysses, ring, cfg):
    """FLUX Kontext: the reference image's tokens join the image tokens (sharded with them)
    and are cut off after the last block; with cfg parallelism each half takes its own."""
    reference = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    cases = [{"name": "kontext", "cond": {"reference_latents": [reference]}, "tokens": 7, "cfg": 3.0,
              "latent": {"height": 6, "width": 10}}]
    _assert_equals_plain(run_ranks(sample_both, 2, str(comfyui_path), "flux", ulysses, ring, cfg, cases), cases)


@pytest.mark.parametrize("ulysses,ring,cfg", [(2, 2, 1), (2, 1, 2)], ids=["ulysses2xring2", "cfg2xulysses2"])
def test_four_ranks_unified_and_cfg_layouts(comfyui_path, ulysses, ring, cfg):
    """4 gloo ranks: unified ulysses x ring, and cfg parallel x ulysses (FLUX, cfg 3)."""
    cases = [{"name": "four-ranks", "cfg": 3.0, "tokens": 7, "latent": {"height": 6, "width": 10}}]
    _assert_equals_plain(run_ranks(sample_both, 4, str(comfyui_path), "flux", ulysses, ring, cfg, cases, timeout=600),
                         cases)


def test_regional_compile_inside_context_parallel_compiles_each_block_class_once(comfyui_path):
    from comfy_para_attn.testing.comfy_cp_checks import compiled_graphs_under_cp

    assert run_ranks(compiled_graphs_under_cp, 2, str(comfyui_path)) == [2, 2]  # double + single block


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_compiled_blocks_issue_the_ring_transfer_before_the_local_kernel(comfyui_path, family, monkeypatch):
    """ComfyUI's real blocks compiled by inductor (Compile Model) under a ring of two: each
    block class issues the K/V transfer, then runs the local block's kernel while it travels,
    then waits for it (inductor's peak-memory reordering once put the transfer last)."""
    from comfy_para_attn.testing.comfy_cp_checks import ring_call_order_in_compiled_blocks

    monkeypatch.setenv("PARA_ATTN_RING_GATHER_TOKENS", "0")  # the overlapping ring, at any length
    from comfy_para_attn.testing.attention_checks import assert_transfer_overlaps_the_local_kernel

    orders = run_ranks(ring_call_order_in_compiled_blocks, 2, str(comfyui_path), family, timeout=900)[0]
    assert len(orders) == 2, orders  # double and single block classes
    for order in orders:
        assert_transfer_overlaps_the_local_kernel(order)


def test_memory_estimate_is_agreed_only_while_batching(comfyui_path):
    """Inside calc_cond_batch the ranks' answer is agreed (0: fits everywhere, inf: does
    not); outside (ComfyUI's load decision) it is ComfyUI's real estimate, so a batch that
    does not fit never makes the next prompt unload the model into low-VRAM mode."""
    from comfy_para_attn.adapters.comfy.agreed_memory import AgreedMemoryEstimate, AgreeWhileBatching
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context

    def estimate(input_shape, cond_shapes={}):
        return 1e6 * input_shape[0]  # bytes, growing with the batch

    agreed = AgreedMemoryEstimate(estimate, build_parallel_context(ContextParallelConfig()))
    small, huge = [2, 16, 8, 8], [10**15, 16, 8, 8]
    assert agreed(small) == 2e6 and agreed(huge) == 1e21
    while_batching = AgreeWhileBatching(agreed)(lambda model, conds, x_in, timestep, options: [
        agreed(s) for s in (small, huge)], None, [], torch.zeros(1, 16, 8, 8), None, {})
    assert while_batching == [0.0, float("inf")]
    assert agreed(huge) == 1e21 and not agreed.batching


def test_ranks_agree_on_the_memory_of_their_share_for_each_job(comfyui_path):
    """Two ranks with different free memory batch alike (inf when one rank's share of the
    call does not fit); a share that fits where the whole call would not is batched; the next
    job asks again (free memory changes between prompts); under cfg parallel a call is halved
    only when it has one chunk per cfg rank (3 conds are not split). The load decision outside
    batching always gets ComfyUI's own estimate."""
    from comfy_para_attn.testing.comfy_cp_checks import agree_on_memory

    two = [2, 16, 8, 8]
    jobs = [((10e9, 1.0e9), two), ((1.5e9, 1.5e9), two), ((0.5e9, 0.5e9), two)]  # one rank / both / neither
    for answers in run_ranks(agree_on_memory, 2, str(comfyui_path), {"ulysses": 2}, jobs):
        assert answers == [(1.6e9, float("inf"), float("inf")), (1.6e9, 0.0, 0.0),
                           (1.6e9, float("inf"), float("inf"))]
    jobs = [((1.5e9, 1.5e9), two), ((1.5e9, 1.5e9), [3, 16, 8, 8])]
    for answers in run_ranks(agree_on_memory, 2, str(comfyui_path), {"cfg": 2}, jobs):
        assert answers == [(1.6e9, 0.0, 0.0), (1.6e9, float("inf"), float("inf"))]


@pytest.mark.parametrize("variant,message", [
    ("wan_vace", "does not support Wan VACE yet"), ("wan_humo", "does not support Wan HuMo yet"),
    ("wan_animate", "does not support Wan Animate yet"), ("wan_s2v", r"does not support this model .*WanModel_S2V")])
def test_wan_variants_that_need_every_token_are_refused(comfyui_path, variant, message):
    """VACE adds residuals by token index; HuMo's audio attention and Animate's face adapter
    group the tokens by frame; S2V's block loop is not patchable. A rank holds a slice of the
    tokens: refused by name rather than sampled wrong, by the node already (before the weights
    travel to the workers, whose failure would end the pool) and in the workers."""
    from comfy_para_attn.adapters.comfy.context_parallel import install_context_parallel
    from comfy_para_attn.adapters.comfy.pool_sampling import make_settings
    from comfy_para_attn.attention import ContextParallelConfig, build_parallel_context
    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models

    model = comfy_models.build(variant)
    running_before = current_pool()
    with pytest.raises(ValueError, match=message):
        make_settings(model, 2, 1, 2, False, 60.0, auto=False)
    assert current_pool() is running_before
    with pytest.raises(ValueError, match=message):
        install_context_parallel(model, build_parallel_context(ContextParallelConfig()))



@pytest.mark.parametrize("ulysses,cfg,served", [(2, 1, 3), (1, 2, 0)], ids=["ulysses2", "cfg2"])
def test_precomputed_modulation_inside_context_parallel(comfyui_path, ulysses, cfg, served):
    """Compile Model's default precomputed modulation under Context Parallel: the rows serve
    every call when the ranks split the sequence, none when they split the cfg batch (the
    batch the rows were chosen for is not the one the blocks get); the same image either way."""
    from comfy_para_attn.testing.comfy_cp_checks import precomputed_modulation_under_cp

    for err, scale, calls in run_ranks(precomputed_modulation_under_cp, 2, str(comfyui_path), ulysses, cfg):
        assert scale > 1e-3 and err < TOL, (err, scale)
        assert calls == served
