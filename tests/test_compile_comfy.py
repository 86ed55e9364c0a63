"""ComfyUI tier: Compile Model (regional torch.compile) on a tiny ComfyUI Flux model sampled
through ComfyUI's real sampling on CPU: equal to eager, each block class compiled once, no
recompile across prompts / seeds / LoRA strength / cache threshold, at most one recompile per
block class for a new resolution with `dynamic`, and the FP8 -> Compile -> First Block Cache ->
KSampler workflow through the real nodes.

Attention: ComfyUI picks sub-quadratic attention on CPU, which queries free memory in Python
(a graph break per call). The tests route attention to ComfyUI's own SDPA function (what CUDA
uses) through `transformer_options["optimized_attention_override"]`, so a block is one graph.
Guard and recompile checks use the "eager" backend (dynamo's guards do not depend on the
backend); one test runs inductor for numerics.
"""
import logging
import weakref

import pytest
import torch

from comfy_para_attn.compile import CompileSettings

STEPS = 3


@pytest.fixture(scope="module")
def flux(cm):
    return cm.use_sdpa_attention(cm.build("flux"))


@pytest.fixture
def dynamo():
    """A clean dynamo cache and counters for each test."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def _graphs(counters) -> int:
    return int(counters["stats"]["unique_graphs"])


def _run(cm, model, *, seed=0, prompt_seed=1, side=8, steps=STEPS):
    pos = cm.conditioning(model, seed=prompt_seed)
    latent = torch.zeros(cm.latent_shape("flux", height=side, width=side))
    return cm.sample(model, pos, [], latent, steps=steps, cfg=1.0, seed=seed)


def test_regional_inductor_matches_eager_and_compiles_each_class_once(cm, flux, dynamo):
    from comfy_para_attn.adapters.comfy.compile import apply_compile

    eager = _run(cm, flux)
    compiled = apply_compile(flux, CompileSettings())
    out = _run(cm, compiled)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    assert _graphs(dynamo) == 2, dict(dynamo["stats"])  # DoubleStreamBlock, SingleStreamBlock
    assert not torch.equal(_run(cm, compiled, prompt_seed=5), out)  # a new prompt runs, no recompile
    assert _graphs(dynamo) == 2
    assert flux.model.diffusion_model.double_blocks[0].__class__.__name__ == "DoubleStreamBlock"  # swapped back


def _blocks_copy_transformer_options(model) -> bool:
    import inspect

    block = model.model.diffusion_model.double_blocks[0]
    return "transformer_options.copy()" in inspect.getsource(type(block).forward)


def test_no_recompile_across_prompts_seeds_lora_and_cache_threshold(cm, flux, dynamo):
    from comfy_para_attn.adapters.comfy.compile import apply_compile
    from comfy_para_attn.adapters.comfy.first_block_cache import apply_first_block_cache
    from comfy_para_attn.cache import FirstBlockCacheSettings

    compiled = apply_compile(flux, CompileSettings(backend="eager"))
    outputs = [_run(cm, compiled, seed=0, prompt_seed=10)]
    # One graph per block class. Newer ComfyUI's blocks copy transformer_options, whose length
    # dynamo guards on: a key that appears after the first call costs one more graph each.
    copies = _blocks_copy_transformer_options(flux)
    first_prompt = _graphs(dynamo)
    assert first_prompt in ((2, 4) if copies else (2,)), dict(dynamo["stats"])
    outputs += [_run(cm, compiled, seed=s, prompt_seed=10 + s) for s in (1, 2)]
    assert _graphs(dynamo) == first_prompt, dict(dynamo["stats"])
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])

    lora = cm.random_lora(flux, scale=1.0)
    by_strength = [_run(cm, cm.apply_lora(compiled, lora, strength)) for strength in (1.0, 0.5)]
    assert (by_strength[0] - by_strength[1]).abs().max() > 1e-3  # the compiled model sees the new weights
    torch.testing.assert_close(by_strength[1], _run(cm, cm.apply_lora(flux, lora, 0.5)), rtol=1e-5, atol=1e-5)

    assert _graphs(dynamo) == first_prompt, dict(dynamo["stats"])
    counts = []
    for threshold in (0.0, 0.2, 0.5):  # the cache decision runs eager between compiled blocks
        _run(cm, apply_first_block_cache(compiled, FirstBlockCacheSettings(threshold)), steps=4)
        counts.append(_graphs(dynamo))
    # Newer ComfyUI's blocks: the cache's key in transformer_options changes its length (one graph
    # more per block class, once); the threshold never recompiles.
    expected = (first_prompt, first_prompt + 2) if copies else (first_prompt,)
    assert counts[0] in expected and counts == counts[:1] * 3, (counts, dict(dynamo["stats"]))


@pytest.mark.parametrize("family", ["flux", "wan", "hunyuan_video"])
def test_resolution_and_batch_changes_recompile_at_most_once_with_dynamic(cm, dynamo, family):
    """One graph per block class for the first shape, one size-generic graph per class at the
    first change of resolution and one more at the first batch above 1 (dynamo specializes
    sizes of 1), none after. Newer ComfyUI's Wan hands its first block a transposed view (the
    others get contiguous tensors): with its strides guarded, every shape compiled two graphs."""
    from comfy_para_attn.adapters.comfy.compile import apply_compile

    model = cm.use_sdpa_attention(cm.build(family))
    from comfy_para_attn.compile import block_classes, repeated_block_names

    dm = model.model.diffusion_model
    classes = len(block_classes(dm, repeated_block_names(dm)))
    compiled = apply_compile(model, CompileSettings(backend="eager", dynamic=True))
    pos = cm.conditioning(model, seed=1)

    def run(side, batch=1):
        latent = torch.randn(cm.latent_shape(family, height=side, width=side, batch=batch),
                             generator=torch.Generator().manual_seed(side))
        out = cm.sample(compiled, pos, [], latent, steps=2, cfg=1.0)
        assert torch.isfinite(out).all()

    run(8)
    assert _graphs(dynamo) == classes, dict(dynamo["stats"])
    run(12)
    assert _graphs(dynamo) == 2 * classes, dict(dynamo["stats"])
    for side in (16, 6):
        run(side)
    assert _graphs(dynamo) == 2 * classes, dict(dynamo["stats"])
    run(8, batch=2)
    assert _graphs(dynamo) == 3 * classes, dict(dynamo["stats"])
    for side, batch in ((12, 3), (6, 2)):
        run(side, batch)
    assert _graphs(dynamo) == 3 * classes, dict(dynamo["stats"])


@pytest.mark.parametrize("family", ["flux", "hunyuan_video"])
def test_prompt_length_changes_recompile_at_most_once(cm, dynamo, family):
    """ComfyUI's HunyuanVideo text encoder does not pad (FLUX's T5 does, up to 256 tokens):
    every prompt length is a new shape. With the default settings the first new length
    compiles one length-generic graph per block class, and later lengths none (a graph per
    length, before, ran the blocks eager after 8 lengths)."""
    from comfy_para_attn.adapters.comfy.compile import apply_compile

    model = cm.build(family)
    compiled = apply_compile(model, CompileSettings(backend="eager"))
    latent = torch.zeros(cm.latent_shape(family))
    counts = []
    for tokens in (8, 9, 10, 12, 16, 7):
        pos = cm.conditioning(model, seed=1, tokens=tokens)
        out = cm.sample(compiled, pos, [], latent, steps=2, cfg=1.0)
        plain = cm.sample(model, pos, [], latent, steps=2, cfg=1.0)
        torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-4)
        counts.append(_graphs(dynamo))
    classes = counts[0]
    assert counts[1] <= 2 * classes and counts[1:] == [counts[1]] * 5, counts


def test_scopes_off_and_replacing_comfy_compile(cm, flux, dynamo, caplog):
    import comfy.patcher_extension
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    from comfy_para_attn.adapters.comfy.compile import WRAPPER_KEY, apply_compile

    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    whole = apply_compile(flux, CompileSettings(scope="whole", backend="eager"))
    torch.testing.assert_close(_run(cm, whole), _run(cm, flux), rtol=1e-5, atol=1e-5)
    off = apply_compile(whole, CompileSettings(scope="off"))
    assert not off.get_wrappers(apply_model, WRAPPER_KEY) and whole.get_wrappers(apply_model, WRAPPER_KEY)
    assert torch.equal(_run(cm, off), _run(cm, flux))

    theirs = flux.clone()
    set_torch_compile_wrapper(theirs, backend="eager")
    with caplog.at_level(logging.INFO):
        ours = apply_compile(theirs, CompileSettings(backend="eager"))
    assert not ours.get_wrappers(apply_model, "torch.compile") and "replacing the TorchCompileModel" in caplog.text

    class NoBlocks(torch.nn.Module):
        pass

    fake = type("P", (), {"model": type("B", (), {"diffusion_model": NoBlocks()})()})()
    from comfy_para_attn.adapters.comfy.compile import compile_targets

    with pytest.raises(ValueError, match="scope 'whole'"):
        compile_targets(fake, "regional")


def test_workflow_fp8_compile_first_block_cache_ksampler(cm, flux, dynamo, pack_nodes):
    """The graph a user builds: FP8 Quantize -> Compile Model -> First Block Cache -> KSampler."""
    pytest.importorskip("torchao", reason="FP8 Quantize needs torchao (a runtime dependency of the pack)")
    import nodes

    bf16 = cm.use_sdpa_attention(cm.build("flux", dtype=torch.bfloat16))
    (model,) = pack_nodes["ParaAttnFP8Quantize"]().apply(bf16, "row-wise", "dynamic activation + weight",
                                                           "img_in, txt_in, time_in, vector_in, guidance_in, "
                                                           "final_layer, *_mod, *modulation*")
    (model,) = pack_nodes["ParaAttnCompile"]().apply(model, "regional", "default", False, False)
    model = model.clone()  # the node's inductor default is slow on a 2-core CPU: same hooks, eager backend
    from comfy_para_attn.adapters.comfy.compile import apply_compile
    model = apply_compile(model, CompileSettings(backend="eager"))
    (model,) = pack_nodes["ParaAttnFirstBlockCache"]().apply(model, 0.2, 0.0, 1.0, -1)
    pos = cm.conditioning(bf16, seed=1)
    latent = {"samples": torch.zeros(cm.latent_shape("flux"))}
    (out,) = nodes.KSampler().sample(model, 7, 4, 1.0, "euler", "simple", pos, pos, latent, denoise=1.0)
    (plain,) = nodes.KSampler().sample(bf16, 7, 4, 1.0, "euler", "simple", pos, pos, latent, denoise=1.0)
    assert torch.isfinite(out["samples"]).all()
    diff = (out["samples"] - plain["samples"]).abs().mean() / plain["samples"].abs().mean()
    assert 0 < diff < 0.1, diff  # fp8 rounding and cache reuse: close to, not equal to, the plain model
    assert _graphs(dynamo) == 2, dict(dynamo["stats"])


def _attention_with_graph_break(func, *args, **kwargs):
    """Stands for a kernel dynamo cannot trace (ComfyUI's CPU sub-quadratic attention, some
    packs' kernels): the block's graph breaks inside attention."""
    from comfy.ldm.modules.attention import attention_pytorch

    torch._dynamo.graph_break()
    return attention_pytorch(*args, **kwargs)


def test_step_count_change_does_not_recompile_when_attention_breaks_the_graph(cm, dynamo):
    """Blocks receive transformer_options, which holds the whole sigma schedule; at a graph
    break dynamo guarded on its length, so every new step count recompiled every block."""
    from comfy_para_attn.adapters.comfy.compile import apply_compile

    model = cm.build("flux")
    model.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = \
        _attention_with_graph_break
    compiled = apply_compile(model, CompileSettings(backend="eager"))
    _run(cm, compiled, steps=2)
    first = _graphs(dynamo)
    assert first >= 4, dict(dynamo["stats"])  # the break split each block class's graph
    for steps in (3, 4, 6):
        assert torch.isfinite(_run(cm, compiled, steps=steps)).all()
    assert _graphs(dynamo) == first, dict(dynamo["stats"])


def test_node_modes_and_cuda_graph_modes_copy_block_inputs(cm, flux, pack_nodes):
    """The node offers the engine's modes; the CUDA-graph ones compile each block behind a copy
    of its inputs (ComfyUI's blocks add their residual in place, which keeps inductor from
    replaying a graph) and start a new replay per model call. The GPU tier runs them."""
    from comfy_para_attn.adapters.comfy.compile import WRAPPER_KEY, apply_compile
    from comfy_para_attn.compile import COMPILE_MODES, GraphSafeInputs
    import comfy.patcher_extension

    choices = pack_nodes["ParaAttnCompile"].INPUT_TYPES()["required"]["mode"][0]
    assert tuple(choices) == COMPILE_MODES
    for mode, graphs in (("default", False), ("max-autotune-no-cudagraphs", False), ("reduce-overhead", True),
                         ("max-autotune", True)):
        model = apply_compile(flux, CompileSettings(mode=mode))
        (wrapper,) = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
        compiled = next(iter(wrapper.compiled.values()))
        assert isinstance(compiled._orig_mod, GraphSafeInputs) == graphs and wrapper.cuda_graphs == graphs, mode


class _Mutable:
    """An unhashable option value (a pack's mutable settings object)."""

    __hash__ = None

    def __init__(self, state):
        self.state = state

    def __eq__(self, other):
        return self is other


def test_model_call_graphs_say_why_a_call_runs_without_one(cm, flux, dynamo, caplog):
    """cuda_graph "model call" on ComfyUI's real sampling: the result is the compiled model's,
    and the log names what keeps the calls from a CUDA graph (here the CPU; with First Block
    Cache its patches; another pack's wrapper by its key). ControlNet, lowvram and gradients
    are checked on the arguments themselves. The GPU tier replays the graphs."""
    import comfy.patcher_extension
    from comfy_para_attn.adapters.comfy.call_graphs import why_not_graphed
    from comfy_para_attn.adapters.comfy.compile import WRAPPER_KEY, apply_compile
    from comfy_para_attn.adapters.comfy.first_block_cache import apply_first_block_cache
    from comfy_para_attn.cache.state import FirstBlockCacheSettings

    positive = cm.conditioning(flux, seed=1)
    latent = torch.randn(cm.latent_shape("flux"), generator=torch.Generator().manual_seed(0))
    plain = cm.sample(apply_compile(flux, CompileSettings(backend="eager")), positive, [], latent, steps=STEPS)
    graphed = apply_compile(flux, CompileSettings(backend="eager", cuda_graph="model call"))
    seen = []

    def watch(executor, *args, **kwargs):  # another pack's APPLY_MODEL wrapper, outside ours
        seen.append(why_not_graphed(executor.class_obj, args, kwargs, WRAPPER_KEY))
        return executor(*args, **kwargs)

    other = graphed.clone()
    other.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_pack", watch)
    with caplog.at_level(logging.INFO):
        out = cm.sample(graphed, positive, [], latent, steps=STEPS)
        cm.sample(apply_first_block_cache(graphed, FirstBlockCacheSettings(residual_diff_threshold=0.1)),
                  positive, [], latent, steps=STEPS)
        cm.sample(other, positive, [], latent, steps=STEPS)
    assert torch.equal(out, plain)
    reasons = [r.getMessage() for r in caplog.records if "run without a CUDA graph" in r.getMessage()]
    assert any("CUDA device" in r for r in reasons), reasons
    assert any("block patches" in r for r in reasons), reasons
    assert any("other nodes wrap the model call (other_pack)" in r for r in reasons), reasons
    assert len(reasons) == 3  # each reason once per wrapper, not once per step
    # The arguments of a real call, varied: each blocker is named (before the device).
    assert seen and seen[0] == "other nodes wrap the model call (other_pack)"
    x = torch.ones(1, 16, 8, 8)
    options = {"cond_or_uncond": [0]}
    base = flux.model
    # A node after Compile Model that swaps model sampling (an object patch, no weight moves)
    # is another graph: `_apply_model`'s sampling arithmetic is inside it.
    import comfy_extras.nodes_model_advanced as advanced
    from comfy_para_attn.adapters.comfy.call_graphs import patches_key

    keys = {}

    def record(name):
        def wrapper(executor, *args, **kwargs):
            keys.setdefault(name, set()).add(patches_key(executor.class_obj))
            return executor(*args, **kwargs)
        return wrapper

    (shifted,) = advanced.ModelSamplingSD3().patch(graphed, 3.0)
    for name, patcher in (("plain", graphed.clone()), ("shifted", shifted.clone())):
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "record", record(name))
        cm.sample(patcher, positive, [], latent, steps=STEPS)
        cm.sample(patcher, positive, [], latent, steps=STEPS)
    assert len(keys["plain"]) == 1 and len(keys["shifted"]) == 1 and keys["plain"] != keys["shifted"]
    # What of transformer_options keys a graph: ComfyUI's per-call dicts with the same
    # settings are one graph; another attention backend or cond order is another.
    from comfy_para_attn.adapters.comfy.call_graphs import options_key
    from comfy_para_attn.adapters.comfy.attention_backend import apply_attention_backend

    settings = {"compile": CompileSettings(cuda_graph="model call")}
    first = {"para_attn": dict(settings), "cond_or_uncond": [0, 1], "sigmas": torch.ones(2), "uuids": [1, 2]}
    again = {"para_attn": dict(settings), "cond_or_uncond": [0, 1], "sigmas": torch.zeros(2), "uuids": [3, 4]}
    assert options_key(first) == options_key(again)
    assert options_key(first) != options_key({**again, "cond_or_uncond": [1, 0]})
    other_backend = apply_attention_backend(flux, "sdpa").model_options["transformer_options"]["para_attn"]
    assert options_key(first) != options_key({**again, "para_attn": {**settings, **other_backend}})
    unhashable = _Mutable({"strength": 1.0})  # keyed by identity, and kept alive by the key
    key = options_key({"some_pack": unhashable})
    alive = weakref.ref(unhashable)
    del unhashable
    assert alive() is not None and key == options_key({"some_pack": alive()})
    assert key != options_key({"some_pack": _Mutable({"strength": 1.0})})
    with torch.no_grad():  # as ComfyUI samples
        assert why_not_graphed(base, (x, x[:, 0, 0, 0], None, x, object(), options), {}, WRAPPER_KEY) == \
            "a ControlNet is applied"
        assert why_not_graphed(base, (x, x, None, x, None, options), {}, WRAPPER_KEY) == \
            "the model does not run on a CUDA device"
        with torch.enable_grad():
            assert why_not_graphed(base, (x, x, None, x, None, options), {}, WRAPPER_KEY) == "gradients are enabled"
        base.model_lowvram = True
        try:
            assert "lowvram" in why_not_graphed(base, (x, x, None, x, None, options), {}, WRAPPER_KEY)
        finally:
            base.model_lowvram = False
        assert why_not_graphed(base, (x, x), {}, WRAPPER_KEY) == "an unexpected apply_model call"


def test_a_unet_asks_for_whole_scope_and_compiles_whole(cm, dynamo):
    """SD1.5's UNet keeps its layers in lists of TimestepEmbedSequential containers, which
    ComfyUI iterates: regional scope must not take them for blocks (a compiled container
    cannot be iterated: 'OptimizedModule' object is not iterable, at the first step)."""
    from comfy_para_attn.adapters.comfy.compile import apply_compile

    patcher = cm.build_sd15_unet()
    with pytest.raises(ValueError, match="Use scope 'whole'"):
        apply_compile(patcher, CompileSettings(backend="eager"))
    pos = [[torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)), {}]]
    latent = torch.zeros(1, 4, 16, 16)
    plain = cm.sample(patcher, pos, [], latent, steps=2, cfg=1.0, seed=0)
    whole = cm.sample(apply_compile(patcher, CompileSettings(backend="eager", scope="whole")), pos, [], latent,
                      steps=2, cfg=1.0, seed=0)
    assert plain.abs().mean() > 1e-3 and torch.isfinite(whole).all()
    torch.testing.assert_close(whole, plain, rtol=1e-4, atol=1e-4)
