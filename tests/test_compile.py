"""Unit tier (CPU, no ComfyUI): regional compile finds the repeated blocks and compiles each
block class once, with no recompile for new values of the same shapes."""
import pytest
import torch

from comfy_para_attn.compile import CompileSettings, FullgraphBreak, compile_modules, describe, repeated_block_names


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x, options={}):
        return x + torch.nn.functional.gelu(self.linear(x)) * (2.0 if options.get("double") else 1.0)


class Other(Block):
    pass


class Steps(torch.nn.Sequential):
    """Like ComfyUI's TimestepEmbedSequential."""


class ToyDiT(torch.nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.embed = torch.nn.Linear(width, width)
        self.double_blocks = torch.nn.ModuleList(Block(width) for _ in range(3))
        self.single_blocks = torch.nn.ModuleList(Other(width) for _ in range(4))
        self.mixed = torch.nn.ModuleList([Block(width), Other(width)])  # not one class: not a region
        # A UNet's input_blocks: containers of one class that ComfyUI iterates, not calls: no region.
        self.input_blocks = torch.nn.ModuleList(Steps(Block(width)) for _ in range(3))


def test_inductor_for_cuda_without_triton_is_refused_up_front():
    """Windows torch wheels come without triton: inductor would fail at the first step."""
    message = CompileSettings().missing_compiler("cuda", have_triton=False)
    assert "needs triton" in message and "triton-windows" in message and "scope to off" in message
    assert CompileSettings().missing_compiler("cuda", have_triton=True) is None
    assert CompileSettings().missing_compiler("cpu", have_triton=False) is None  # C++ kernels on CPU
    assert CompileSettings(scope="off").missing_compiler("cuda", have_triton=False) is None
    assert CompileSettings(backend="eager").missing_compiler("cuda", have_triton=False) is None


def test_settings():
    kwargs = CompileSettings().compile_kwargs()
    assert kwargs == dict(backend="inductor", fullgraph=False, dynamic=None, options=kwargs["options"])  # automatic
    assert set(kwargs["options"]) == {"pre_grad_custom_pass", "triton.multi_kernel"}  # ours; "default" adds none
    graphs = CompileSettings(mode="max-autotune", dynamic=True).compile_kwargs()["options"]
    assert graphs["triton.cudagraphs"] and graphs["max_autotune"]  # the mode, as inductor options
    assert CompileSettings(backend="eager").compile_kwargs() == dict(backend="eager", fullgraph=False, dynamic=None)
    assert CompileSettings(dynamic=False).compile_kwargs()["dynamic"] is False  # a graph per shape
    assert not CompileSettings(scope="off").enabled
    with pytest.raises(ValueError):
        CompileSettings(scope="everything")
    assert CompileSettings(cuda_graph="model call").call_graphs and not CompileSettings().call_graphs
    assert not CompileSettings(scope="off", cuda_graph="model call").call_graphs
    with pytest.raises(ValueError, match="pick one"):  # two kinds of CUDA graph at once
        CompileSettings(mode="reduce-overhead", cuda_graph="model call")
    with pytest.raises(ValueError, match="cuda_graph must be one of"):
        CompileSettings(cuda_graph="blocks")


def test_regional_compile_once_per_class():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    toy = ToyDiT()
    names = repeated_block_names(toy)
    assert names == [f"double_blocks.{i}" for i in range(3)] + [f"single_blocks.{i}" for i in range(4)]
    assert describe(toy, names) == "7 blocks of 2 class(es): Block, Other"
    compiled = compile_modules(toy, names, CompileSettings(backend="eager"))
    with torch.no_grad():
        for seed in range(3):  # new values and new option values: same graphs
            x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(seed))
            y = x
            for name in names:
                expected = toy.get_submodule(name)(y, {"step": seed})
                y = compiled[name](y, {"step": seed})
                torch.testing.assert_close(y, expected)
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


class BreakingBlock(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)

    def forward(self, x):
        y = self.linear(x)
        torch._dynamo.graph_break()  # as code dynamo cannot trace (ComfyUI's CPU attention's memory check)
        return y + 1


class TwoBreakingBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(BreakingBlock() for _ in range(2))


def test_fullgraph_reports_a_break_even_after_the_block_ran_compiled_without_it():
    """Dynamo reuses a block's entries from an earlier compile whose backend compares equal;
    fullgraph on, after the same blocks ran compiled with it off (an earlier prompt), must
    still fail on the graph break, as on a fresh process. Both ways give the eager result."""
    torch._dynamo.reset()
    model = TwoBreakingBlocks()
    names = repeated_block_names(model)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.blocks[0](x)
        lenient = compile_modules(model, names, CompileSettings(backend="eager", fullgraph=False))
        torch.testing.assert_close(lenient[names[0]](x), expected)
        strict = compile_modules(model, names, CompileSettings(backend="eager", fullgraph=True))
        with pytest.raises(FullgraphBreak, match=r"Compile Model \(fullgraph on\): BreakingBlock cannot be compiled as "
                           r"one graph: .*Turn fullgraph off") as info:
            strict[names[0]](x)
        assert isinstance(info.value.__cause__, torch._dynamo.exc.Unsupported)
        torch.testing.assert_close(lenient[names[0]](x), expected)  # the lenient compile still runs
    assert getattr(strict[names[0]], "linear") is model.blocks[0].linear  # attributes reach the block
    torch._dynamo.reset()


def test_fullgraph_compiles_many_block_classes():
    """Dynamo keeps at most 8 entries per code object, and past that a fullgraph compile fails:
    the wrapper each fullgraph block goes through has a forward of its own per block class, so
    ten block classes (two models' worth) compile as before, each on its own budget."""
    torch._dynamo.reset()
    classes = [type(f"Block{i}", (Block,), {}) for i in range(10)]
    model = torch.nn.Module()
    for i, cls in enumerate(classes):
        setattr(model, f"family{i}", torch.nn.ModuleList(cls(8) for _ in range(2)))
    names = repeated_block_names(model)
    assert len(names) == 20
    compiled = compile_modules(model, names, CompileSettings(backend="eager", fullgraph=True))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in names:
            torch.testing.assert_close(compiled[name](x), model.get_submodule(name)(x))
    torch._dynamo.reset()


def test_reaching_torchs_recompile_limit_is_said_once_in_compile_models_words(caplog):
    """Past dynamo's recompile limit a block runs eagerly for the rest of the process, and
    torch's own warning names neither the node nor what to do: the notice does, once."""
    from comfy_para_attn.compile import watch_recompile_limit

    torch._dynamo.reset()
    watch_recompile_limit()
    watch_recompile_limit()  # installing twice adds no second notice
    toy = ToyDiT()
    compiled = compile_modules(toy, ["double_blocks.0"], CompileSettings(backend="eager", dynamic=False))
    block = compiled["double_blocks.0"]
    with torch._dynamo.config.patch(recompile_limit=2), caplog.at_level("WARNING"), torch.no_grad():
        for tokens in range(1, 7):  # static shapes: a graph per token count, until the limit
            x = torch.randn(1, tokens, 16)
            torch.testing.assert_close(block(x), toy.double_blocks[0](x))  # eager past it: still right
    notices = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compile Model: torch reached")]
    assert len(notices) == 1, notices
    assert "limit of 2 compiled graphs" in notices[0] and "Restart ComfyUI" in notices[0], notices
    torch._dynamo.reset()


def test_a_fullgraph_block_past_the_recompile_limit_says_so():
    """With fullgraph on, dynamo raises at the limit instead of running the block eagerly."""
    torch._dynamo.reset()
    toy = ToyDiT()
    block = compile_modules(toy, ["double_blocks.0"], CompileSettings(backend="eager", dynamic=False,
                                                                       fullgraph=True))["double_blocks.0"]
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        block(torch.randn(1, 3, 16))
        with pytest.raises(FullgraphBreak, match="reached its recompile limit for Block.*turn fullgraph off"):
            block(torch.randn(1, 4, 16))
    torch._dynamo.reset()
