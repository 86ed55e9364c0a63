"""First Block Cache under Context Parallel (comfyui tier, 2 CPU worker ranks): the cache
runs inside the workers, both ranks take the same reuse decisions (their logged summaries
agree), and the result equals in-process cached sampling."""
import logging

import pytest
import torch


pytestmark = pytest.mark.usefixtures("pool_cleanup")


@pytest.mark.parametrize("family,layout", [("flux", dict(ulysses_degree=2)), ("hunyuan_video", dict(ring_degree=2))])
def test_cache_decisions_agree_across_ranks(comfyui_path, pack_nodes, caplog, family, layout):
    from comfy_para_attn.adapters.comfy import pool_sampling
    from comfy_para_attn.testing import comfy_models
    from comfy_para_attn.testing.comfy_pool_checks import sampling_inputs

    patcher, pos, neg, latent = sampling_inputs(family)
    cached = pack_nodes["ParaAttnFirstBlockCache"]().apply(patcher, 0.6, 0.0, 1.0, -1)[0]
    caplog.set_level(logging.INFO)
    in_process = comfy_models.sample(cached, pos, neg, latent, steps=8, cfg=1.0)
    local_summary = [r.getMessage() for r in caplog.records if "First Block Cache: reused" in r.getMessage()]
    assert len(local_summary) == 1
    caplog.clear()

    args = dict(gpus=2, layout="manual", ulysses_degree=1, ring_degree=1, cfg_parallel=False, timeout_s=120.0)
    args.update(layout)
    parallel_model = pack_nodes["ParaAttnContextParallel"]().apply(cached, **args)[0]
    parallel = comfy_models.sample(parallel_model, pos, neg, latent, steps=8, cfg=1.0)

    summaries = [[line for line in lines if line.startswith("First Block Cache:")] for lines in pool_sampling.last_run_logs]
    assert len(summaries) == 2 and all(len(s) == 1 for s in summaries), summaries
    assert summaries[0] == summaries[1], f"ranks disagree: {summaries}"
    assert local_summary[0].endswith(summaries[0][0].split("First Block Cache: ")[1])
    reused = int(summaries[0][0].split("reused ")[1].split(" of")[0])
    assert 0 < reused < 8, summaries  # the cache did something, and not everything
    # the ComfyUI log of the server shows the worker's summary line
    assert any("First Block Cache: reused" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(parallel).all()
    assert (parallel - in_process).abs().max().item() < 1e-3
