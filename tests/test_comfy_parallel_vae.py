"""Parallel VAE Decode in real ComfyUI (comfyui tier): tiny random VAEs built from ComfyUI's
own classes (FLUX: AutoencodingEngine 2D; HunyuanVideo: causal 3D AutoencoderKL; Wan 2.1
and 2.2: WanVAE; HunyuanImage 2.1: 32x 2D; HunyuanVideo 1.5: 16x causal 3D), decoded on 2 CPU
pool ranks, in-process, and by ComfyUI's own VAEDecodeTiled."""
import pytest
import torch

POOL_TOL = 1e-5  # other processes may run the convolutions with other thread counts

CASES = {
    # kind: (latent size, node settings (tile, overlap, frames, frame overlap))
    "flux": (dict(height=9, width=11), (64, 16, 64, 8)),
    "hunyuan_video": (dict(frames=4, height=6, width=7), (32, 8, 8, 4)),
    "wan": (dict(frames=4, height=6, width=7), (32, 8, 8, 4)),
    "wan22": (dict(frames=4, height=5, width=6), (64, 16, 8, 4)),  # 16 px per latent element
    "hunyuan_image": (dict(height=5, width=6), (128, 32, 64, 8)),  # HunyuanImage 2.1: 32 px per element
    "hunyuan_video15": (dict(frames=4, height=5, width=6), (64, 16, 8, 4)),
}
NEWER_COMFYUI_ONLY = {"hunyuan_video15": "HunyuanVideo15"}  # kind: the model_base class that marks it


@pytest.fixture(scope="module")
def pool_cleanup():
    yield
    from comfy_para_attn.pool import shutdown_pool

    shutdown_pool()


def _node(pack_nodes, vae, z, settings, gpus):
    return pack_nodes["ParaAttnParallelVAEDecode"]().decode({"samples": z}, vae, gpus, *settings)[0]


def _comfy_tiled(vae, z, settings):
    import nodes

    with torch.inference_mode():  # as ComfyUI's executor runs it (newer ComfyUI's VAEs finish in place)
        return nodes.VAEDecodeTiled().decode(vae, {"samples": z}, *settings)[0]


@pytest.mark.parametrize("kind", list(CASES))
def test_parallel_decode_equals_comfy_tiled(comfyui_path, pack_nodes, pool_cleanup, kind):
    import comfy.model_base
    import comfy.utils

    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    if kind in NEWER_COMFYUI_ONLY and not hasattr(comfy.model_base, NEWER_COMFYUI_ONLY[kind]):
        pytest.skip(f"this ComfyUI has no {NEWER_COMFYUI_ONLY[kind]} (its VAE code decodes another layout)")
    vae = tiny_comfy_vae(kind)
    size, settings = CASES[kind]
    for batch, extra in ((1, {}), (2, {"height": 3, "width": 2})):  # a latent smaller than a tile
        z = latent(kind, batch=batch, **{**size, **extra}, seed=batch)
        reference = _comfy_tiled(vae, z, settings)
        in_process = _node(pack_nodes, vae, z, settings, gpus=1)
        assert torch.equal(in_process, reference), f"{kind}: in-process differs from VAEDecodeTiled"
        updates = []
        comfy.utils.set_progress_bar_global_hook(lambda value, total, *a, **k: updates.append((value, total)))
        try:
            pooled = _node(pack_nodes, vae, z, settings, gpus=2)
        finally:
            comfy.utils.set_progress_bar_global_hook(None)
        assert pooled.shape == reference.shape
        # not a view of rank 0's shared-memory file, whose pages would stay in /dev/shm
        assert pooled.untyped_storage().filename is None, kind
        assert reference.std() > 0.05
        err = (pooled - reference).abs().max().item()
        assert err < POOL_TOL, f"{kind} batch {batch}: pool vs VAEDecodeTiled max abs err {err:.3g}"
        assert updates and updates[-1][0] == updates[-1][1] > 0, updates


def test_same_pool_as_context_parallel_and_vae_cached(comfyui_path, pack_nodes, pool_cleanup):
    from comfy_para_attn.adapters.comfy import parallel_vae, published
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    patcher, pos, neg, image = sampling_inputs("flux")
    cp = pack_nodes["ParaAttnContextParallel"]().apply(patcher, gpus=2, layout="manual", ulysses_degree=2, ring_degree=1,
                                                   cfg_parallel=False, timeout_s=120.0)[0]
    comfy_models.sample(cp, pos, neg, image, steps=1, sampler_name="euler", cfg=1.0)
    from comfy_para_attn.pool import registry

    pids = registry._current.pids  # the pool Context Parallel started or reused
    vae = tiny_comfy_vae("flux")
    z = latent("flux", height=5, width=6)
    _node(pack_nodes, vae, z, (64, 16, 64, 8), gpus=2)
    handles = dict(published._published)
    _node(pack_nodes, vae, z, (64, 16, 64, 8), gpus=2)
    assert parallel_vae.shared_pool(2, "cpu").pids == pids, "the VAE decode started a second pool"
    assert published._published == handles, "the VAE weights were published twice"
    assert any(h.key.startswith("vae-") for h in handles.values())


def test_a_running_pool_with_enough_ranks_is_used_as_it_is(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """Context Parallel on 3 ranks, Parallel VAE Decode asking 2 (or 0, all): the decode runs on
    the 3 running ranks instead of restarting the pool for 2 (and Context Parallel restarting it
    again at the next prompt); asking for more than the pool has, by number, restarts it."""
    import logging

    from comfy_para_attn.pool import current_pool
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    patcher, pos, neg, image = sampling_inputs("flux")
    cp = pack_nodes["ParaAttnContextParallel"]().apply(patcher, gpus=3, layout="manual", ulysses_degree=1, ring_degree=3,
                                                   cfg_parallel=False, timeout_s=120.0)[0]
    comfy_models.sample(cp, pos, neg, image, steps=1, sampler_name="euler", cfg=1.0)
    pids = current_pool().pids
    vae, z = tiny_comfy_vae("flux"), latent("flux", height=9, width=11)
    settings = CASES["flux"][1]
    reference = _comfy_tiled(vae, z, settings)
    with caplog.at_level(logging.INFO, logger="comfy_para_attn"):
        for gpus in (2, 0):
            decoded = _node(pack_nodes, vae, z, settings, gpus=gpus)
            assert current_pool().pids == pids, f"gpus {gpus}: the pool was restarted"
            assert (decoded - reference).abs().max().item() < POOL_TOL
    assert "decoding on the running worker pool's 3 cpu ranks (Context Parallel's) instead of restarting it for 2" \
        in caplog.text, caplog.text
    decoded = _node(pack_nodes, vae, z, settings, gpus=4)
    assert len(current_pool().pids) == 4 and (decoded - reference).abs().max().item() < POOL_TOL


def test_bad_inputs_are_clear_errors(comfyui_path, pack_nodes):
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    flux, video = tiny_comfy_vae("flux"), tiny_comfy_vae("hunyuan_video")
    z = latent("flux", height=4, width=4)
    with pytest.raises(ValueError, match="has 4 channels but this VAE takes 16"):
        _node(pack_nodes, flux, z[:, :4], (64, 16, 64, 8), gpus=2)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\] \(video\)"):
        _node(pack_nodes, video, z, (64, 16, 64, 8), gpus=2)


def test_too_large_overlaps_are_reduced_as_comfyui_does(comfyui_path, pack_nodes, pool_cleanup, caplog):
    """VAE Decode (Tiled) reduces overlap to tile_size / 4 and halves temporal_overlap when they
    are too large; the drop-in node does the same (and says so) instead of refusing."""
    import logging

    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    cases = [("flux", latent("flux", height=9, width=11), (64, 64, 64, 8), "overlap 64 -> 16"),
             ("flux", latent("flux", height=9, width=11), (64, 32, 64, 8), "overlap 32 -> 16"),
             ("hunyuan_video", latent("hunyuan_video", frames=4, height=6, width=7), (32, 8, 8, 8),
              "temporal_overlap 8 -> 4")]
    for kind, z, settings, said in cases:
        vae = tiny_comfy_vae(kind)
        reference = _comfy_tiled(vae, z, settings)
        with caplog.at_level(logging.WARNING):
            in_process = _node(pack_nodes, vae, z, settings, gpus=1)
            pooled = _node(pack_nodes, vae, z, settings, gpus=2)
        assert reference.std() > 0.05 and torch.equal(in_process, reference), kind
        assert (pooled - reference).abs().max().item() < POOL_TOL, kind
        assert any(said in r.getMessage() and "reduced as VAE Decode (Tiled) does" in r.getMessage()
                   for r in caplog.records), kind
        caplog.clear()


def test_interrupt_stops_the_decode_and_the_pool_survives(comfyui_path, pack_nodes, pool_cleanup):
    import comfy.model_management

    from comfy_para_attn.adapters.comfy import parallel_vae
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    vae = tiny_comfy_vae("hunyuan_video")
    z = latent("hunyuan_video", frames=4, height=6, width=7)
    settings = CASES["hunyuan_video"][1]
    for gpus in (1, 2):
        comfy.model_management.interrupt_current_processing(True)
        try:
            with pytest.raises(comfy.model_management.InterruptProcessingException):
                parallel_vae.parallel_decode(vae, z, parallel_vae.TiledDecodeSettings(*settings), gpus=gpus,
                                             timeout_s=60)
        finally:
            comfy.model_management.interrupt_current_processing(False)
    pids = parallel_vae.shared_pool(2, "cpu").pids
    assert _node(pack_nodes, vae, z, settings, gpus=2).shape[0] == 13
    assert parallel_vae.shared_pool(2, "cpu").pids == pids


def test_a_failure_in_the_workers_is_an_error_and_the_pool_stays(comfyui_path, pack_nodes, pool_cleanup):
    """A VAE that fails to load on one rank, then one that runs out of memory on one rank's
    second tile: every rank stops together, the error names the rank and what to change, and
    the same workers decode the next VAE."""
    from comfy_para_attn.adapters.comfy import parallel_vae
    from comfy_para_attn.pool import PoolJobError
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    z = latent("flux", height=9, width=11)
    assert _node(pack_nodes, tiny_comfy_vae("flux"), z, (32, 8, 64, 8), gpus=2).shape == (1, 72, 88, 3)
    pids = parallel_vae.shared_pool(2, "cpu").pids
    vae = tiny_comfy_vae("flux")
    vae.para_attn_rebuild = ("comfy_para_attn.testing.vae_models:rebuild_failing_on_rank_1", {"kind": "flux", "ch": 32})
    with pytest.raises(PoolJobError, match="injected VAE rebuild failure") as info:
        _node(pack_nodes, vae, z, (32, 8, 64, 8), gpus=2)
    assert info.value.rank == 1 and "rebuild_failing_on_rank_1" in info.value.worker_traceback
    vae = tiny_comfy_vae("flux", seed=1)
    vae.para_attn_rebuild = ("comfy_para_attn.testing.vae_models:rebuild_out_of_memory_on_rank_1",
                             {"kind": "flux", "ch": 32})
    with pytest.raises(PoolJobError, match="(?s)rank 1 ran out of memory.*lower tile_size on Parallel VAE Decode"):
        _node(pack_nodes, vae, z, (32, 8, 64, 8), gpus=2)
    good = tiny_comfy_vae("flux", seed=2)
    assert _node(pack_nodes, good, z, (32, 8, 64, 8), gpus=2).shape == (1, 72, 88, 3)
    assert parallel_vae.shared_pool(2, "cpu").pids == pids


def test_a_vae_the_workers_cannot_rebuild_is_decoded_in_process(comfyui_path, pack_nodes, pool_cleanup, caplog):
    from comfy_para_attn.testing.vae_models import latent, tiny_comfy_vae

    vae = tiny_comfy_vae("flux")
    vae.para_attn_rebuild = ("comfy_para_attn.testing.vae_models:rebuild_as_another_class", {"kind": "flux", "ch": 32})
    z = latent("flux", height=9, width=11)
    expected = _comfy_tiled(vae, z, (32, 8, 64, 8))
    with caplog.at_level("WARNING", logger="comfy_para_attn"):
        first = _node(pack_nodes, vae, z, (32, 8, 64, 8), gpus=2)
        second = _node(pack_nodes, vae, z, (32, 8, 64, 8), gpus=2)
    assert torch.isfinite(expected).all() and expected.std() > 0.01
    assert torch.equal(first, expected) and torch.equal(second, expected)
    warnings = [r.getMessage() for r in caplog.records if "cannot rebuild this VAE" in r.getMessage()]
    assert len(warnings) == 1 and "gave a Identity" in warnings[0]
    from comfy_para_attn.adapters.comfy import published

    assert published._fingerprints[vae.first_stage_model] not in published._published  # its /dev/shm copy is gone


def test_a_first_weight_write_drives_the_running_nodes_progress_bar(comfyui_path):
    """The one-time write of a model's weights to shared memory (~20 s for FLUX.1-dev) shows
    on ComfyUI's progress bar of the running node, 0 to 100%, one update per percent at most;
    a second publish of the same weights writes nothing and shows nothing."""
    import comfy.utils

    from comfy_para_attn.adapters.comfy import published

    module = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(30)])
    seen = []
    old_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append((value, total)))
    try:
        first = published.publish_weights(module, module.state_dict, "progress-test")
        shown = list(seen)
        again = published.publish_weights(module, module.state_dict, "progress-test")
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        published._published.pop(first[0]).release()
        published._recent.pop("progress-test", None)
    assert again[0] == first[0] and len(seen) == len(shown)
    values = [value for value, _ in shown]
    assert all(total == 100 for _, total in shown) and values[-1] == 100
    assert values == sorted(set(values)) and 1 < len(values) <= 101
