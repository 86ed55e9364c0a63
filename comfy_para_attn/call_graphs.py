"""Whole model calls replayed as CUDA graphs.

A compiled FLUX step on an H100 launches ~2,000 kernels: the GPU finishes some of them faster
than Python (dynamo's guards, ComfyUI's block loop, Triton's launcher) queues the next ones, so
it idles in many short gaps. Captured once, a model call replays as one graph launch. What a
graph reads is fixed at capture: the addresses of its inputs (copied into static buffers at
every call), of the weights (checked by `weights_token`), and every host-side decision the
code took (so the caller decides which calls may be graphed: no per-step Python branches).

`CallGraphs` keeps one graph per input layout (shapes, dtypes, strides, devices, the
non-tensor arguments and the caller's key). A layout's first call runs normally (it compiles
and warms up, and cuBLAS / cuDNN pick their kernels), the second is captured and replayed,
later ones replay. A capture that fails (a host sync inside, an unsupported op) is logged once
and that layout runs normally from then on. Nothing here knows about ComfyUI.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

log = logging.getLogger(__name__)

WARMUP_CALLS = 1  # normal calls of a layout before its capture
MAX_GRAPHS = 4  # layouts kept at once (each holds its inputs and outputs; all share one pool)
MAX_TRACKED = 256  # layouts whose normal calls are counted (keys hold the objects they name)


class NotGraphable(Exception):
    """The call's arguments cannot key a graph (an unhashable non-tensor argument)."""


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    inputs: list  # static input buffers, in the order of the call's tensor leaves
    output: Any  # the captured output (static buffers, overwritten by every replay)


def _tensor_layout(t: torch.Tensor) -> tuple:
    return ("tensor", tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


_PLAIN = (torch.Tensor, torch.nn.Parameter, torch.nn.Buffer) if hasattr(torch.nn, "Buffer") else (
    torch.Tensor, torch.nn.Parameter)


def _inner_tensors(t: torch.Tensor) -> list:
    """[t], or the plain tensors inside a tensor subclass (torchao's fp8 weights)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if type(t) in _PLAIN or not is_traceable_wrapper_subclass(t):
        return [t]
    kind = type(t)
    names = getattr(kind, "tensor_data_names", None)  # torchao's: no flatten (its context costs ~2 us)
    if names is None or getattr(kind, "optional_tensor_data_names", None):
        names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in _inner_tensors(getattr(t, name))]


def weights_token(module: torch.nn.Module) -> tuple:
    """Where and what each parameter and buffer of `module` is: a graph captured against one
    token is valid while the module's token stays the same (in-place changes of the values
    are fine; a graph reads them at replay). Checked once per sampling run, not per call;
    FLUX.1-dev-sized fp8 (~1,000 tensors, 228 of them torchao's): 3.0 ms of host time on a
    slow CPU, where the `parameters()` walk, flattening and tuples of every layout took 4.7."""
    token = []
    for mod in module.modules():
        for tensors in (mod._parameters, mod._buffers):
            for tensor in tensors.values():
                if tensor is not None:
                    token.extend((inner.data_ptr(), inner.shape, inner.stride(), inner.dtype, inner.device)
                                 for inner in _inner_tensors(tensor))
    return tuple(token)


class CallGraphs:
    """CUDA graphs of one callable's calls, keyed by the layout of their arguments."""

    def __init__(self, name: str = "model call"):
        self.name = name
        self._graphs: dict = {}
        self._calls: dict = {}  # key -> normal calls so far
        self._failed: set = set()
        self._pool = None
        self._weights: Optional[tuple] = None
        self.captures = 0  # for tests and logs
        self.replays = 0

    def reset(self) -> None:
        """Drop every graph and its memory pool (the caching allocator frees the pool's
        blocks once no graph refers to them), and forget the weights they were made for.
        Layouts whose capture failed stay refused: a retry would fail again, and some torch
        versions keep a failed capture's memory."""
        self._drop_graphs()
        self._weights = None

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._calls.clear()
        self._pool = None

    def check_weights(self, token: tuple) -> None:
        """Drop the graphs if the weights moved since they were captured."""
        if self._weights is not None and token != self._weights:
            log.debug("%s CUDA graphs: the weights changed, recapturing", self.name)
            self.reset()
        self._weights = token

    def key(self, inputs, extra=()) -> tuple:
        return self._key(*tree_flatten(inputs), extra)

    @staticmethod
    def _key(leaves: list, spec, extra) -> tuple:
        layout = tuple(_tensor_layout(v) if isinstance(v, torch.Tensor) else v for v in leaves)
        key = (spec, layout, extra)
        try:
            hash(key)
        except TypeError as e:
            raise NotGraphable(f"an argument is not hashable ({e})") from None
        return key

    def __call__(self, fn: Callable, inputs: tuple, extra=()):
        """`fn(*inputs)`, replayed from a graph where one is captured for this layout. Every
        tensor in `inputs` (nested in lists, tuples, dicts) is an input of the graph; `extra`
        is what else the call depends on (hashable). Raises `NotGraphable` (before running
        anything) when the arguments cannot key a graph."""
        leaves, spec = tree_flatten(inputs)
        key = self._key(leaves, spec, extra)
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        off_gpu = [v for v in tensors if v.device.type != "cuda"]
        if off_gpu:  # a graph would keep a host tensor's value at capture, not read it anew
            raise NotGraphable(f"an input tensor is on the {off_gpu[0].device.type}")
        graph = self._graphs.get(key)
        if graph is not None:
            return self._replay(graph, tensors)
        if key in self._failed or self._calls.get(key, 0) < WARMUP_CALLS:
            if len(self._calls) >= MAX_TRACKED and key not in self._calls:
                self._calls.clear()
            self._calls[key] = self._calls.get(key, 0) + 1
            return fn(*inputs)
        if len(self._graphs) >= MAX_GRAPHS:  # one more layout: start over rather than grow
            self._drop_graphs()
        try:
            graph = self._capture(fn, leaves, spec)
        except Exception as e:  # a sync or an op CUDA graphs cannot hold: this layout runs normally
            self._failed.add(key)
            log.warning("%s: not replayed as a CUDA graph (capture failed: %s: %s); it runs normally",
                        self.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return fn(*inputs)
        self._graphs[key] = graph
        self.captures += 1
        return self._replay(graph, tensors)

    def _capture(self, fn, leaves: list, spec) -> _Graph:
        static = [torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device).copy_(v)
                  if isinstance(v, torch.Tensor) else v for v in leaves]
        graph = torch.cuda.CUDAGraph()
        pool = self._pool if self._pool is not None else torch.cuda.graph_pool_handle()
        began = time.perf_counter()
        # thread_local: ComfyUI's other threads (previews, the server) may use CUDA meanwhile.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            reserved = torch.cuda.memory_reserved()  # after the graph's own empty_cache
            output = fn(*tree_unflatten(static, spec))
        self._pool = pool
        log.info("%s: captured as a CUDA graph in %.2f s (%d inputs; GPU memory reserved %+.2f GiB)", self.name,
                 time.perf_counter() - began, sum(isinstance(v, torch.Tensor) for v in static),
                 (torch.cuda.memory_reserved() - reserved) / 2**30)
        return _Graph(graph, [v for v in static if isinstance(v, torch.Tensor)], output)

    def _replay(self, graph: _Graph, tensors: list):
        """Replay with `tensors` (the call's tensor arguments, in flattening order) copied in."""
        for buffer, value in zip(graph.inputs, tensors):
            if buffer.data_ptr() != value.data_ptr():
                buffer.copy_(value)
        graph.graph.replay()
        self.replays += 1
        # The next replay overwrites the output buffers: the caller gets its own copy.
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, graph.output)
