"""Unit tier (CPU): what keys a whole-call CUDA graph and what invalidates it. The replays
themselves need CUDA: `tests/test_compile_gpu.py` samples with them."""
import pytest
import torch

from comfy_para_attn.call_graphs import CallGraphs, NotGraphable, weights_token


def test_key_is_the_layout_of_the_arguments_not_their_values():
    graphs = CallGraphs()
    x = torch.randn(2, 4, 8)
    key = graphs.key(((x, torch.ones(2)), {"guidance": torch.full((2,), 3.5), "method": "offset"}))
    same = graphs.key(((torch.randn(2, 4, 8), torch.zeros(2)), {"guidance": torch.ones(2), "method": "offset"}))
    assert key == same
    others = [
        ((torch.randn(1, 4, 8), torch.ones(2)), {"guidance": torch.ones(2), "method": "offset"}),  # shape
        ((x.half(), torch.ones(2)), {"guidance": torch.ones(2), "method": "offset"}),  # dtype
        ((x.transpose(1, 2).contiguous().transpose(1, 2), torch.ones(2)),
         {"guidance": torch.ones(2), "method": "offset"}),  # strides
        ((x, torch.ones(2)), {"guidance": torch.ones(2), "method": "index"}),  # a non-tensor argument
        ((x, torch.ones(2)), {"guidance": None, "method": "offset"}),  # an argument missing
        ((x, torch.ones(2)), {"guidance": torch.ones(2), "method": "offset", "extra": torch.ones(1)}),
    ]
    for inputs in others:
        assert graphs.key(inputs) != key
    assert graphs.key(((x, torch.ones(2)), {}), extra=((0, 1),)) != graphs.key(((x, torch.ones(2)), {}), extra=((0,),))
    with pytest.raises(NotGraphable):
        graphs.key(((x,), {"options": {1, 2}}))  # a set: a leaf, and unhashable


def test_a_call_that_cannot_key_a_graph_raises_before_running():
    """Unhashable arguments, and tensors off the GPU (a graph would keep a host tensor's
    value from the capture instead of reading it at every replay)."""
    ran = []
    with pytest.raises(NotGraphable, match="not hashable"):
        CallGraphs()(lambda *a: ran.append(a), (torch.ones(2),), extra=([],))
    with pytest.raises(NotGraphable, match="input tensor is on the cpu"):
        CallGraphs()(lambda *a: ran.append(a), (torch.ones(2),))
    assert not ran


def test_weights_token_follows_replaced_weights_not_values():
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    module.register_buffer("scale", torch.ones(8))
    token = weights_token(module)
    assert len(token) == 5
    with torch.no_grad():
        module[0].weight.mul_(2.0)  # in place: a graph reads the new values at replay
    assert weights_token(module) == token
    module[0].weight = torch.nn.Parameter(module[0].weight.detach().clone())  # what a LoRA patch does
    assert weights_token(module) != token
    module[0].weight = torch.nn.Parameter(module[0].weight.detach().half())
    assert torch.float16 in {entry[3] for entry in weights_token(module)}  # dtype is part of it


def test_weights_token_looks_inside_fp8_weights():
    pytest.importorskip("torchao")
    from comfy_para_attn.testing.fp8_checks import make_dynamic_fp8

    linear = make_dynamic_fp8(torch.nn.Linear(32, 32).to(torch.bfloat16))
    token = weights_token(linear)
    assert len(token) >= 3  # the fp8 values, their scales, the bias
    assert {entry[-2] for entry in token} >= {torch.float8_e4m3fn, torch.float32}


def test_graph_state_resets_when_weights_move_but_failed_captures_stay_refused():
    graphs = CallGraphs()
    graphs.check_weights((1, 2))
    graphs._graphs["k"] = object()
    graphs._failed.add("j")
    graphs.check_weights((1, 2))
    assert graphs._graphs
    graphs.check_weights((1, 3))
    assert not graphs._graphs and graphs._failed == {"j"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA, where the capture fails")
def test_a_failed_capture_runs_the_call_normally_once_logged(caplog):
    """Here the capture itself fails (no CUDA): the call still returns its result, the
    failure is logged once, and that layout is not captured again."""
    graphs, ran = CallGraphs("toy"), []

    def fn(value):
        ran.append(value)
        return value * 2

    with caplog.at_level("WARNING"):
        assert [graphs(fn, (3,)) for _ in range(4)] == [6, 6, 6, 6]
    assert ran == [3, 3, 3, 3] and graphs.captures == 0 and len(graphs._failed) == 1
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1


def test_layouts_counted_and_graphs_kept_are_bounded():
    from comfy_para_attn.call_graphs import MAX_TRACKED

    graphs = CallGraphs()
    for value in range(MAX_TRACKED + 40):  # a new non-tensor argument every call
        graphs(lambda v: v, (value,))
    assert len(graphs._calls) <= MAX_TRACKED
