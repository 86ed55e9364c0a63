"""Regional torch.compile: compile the repeated transformer blocks, not the whole model.

A DiT is a few dozen instances of one or two block classes. `torch.compile` of each instance
shares one dynamo cache entry per class (the cache lives on the forward's code object, and
parameters are graph inputs since `inline_inbuilt_nn_modules`), so FLUX.1 compiles two
graphs (double and single block) instead of one graph of 57 inlined blocks: warm-up drops
from about a minute to seconds, with the same kernels in the hot path. Code between blocks
(embedders, block patches such as First Block Cache's decision, context-parallel sharding)
stays eager, so it can branch freely without graph breaks or recompiles.

Nothing here knows about ComfyUI; `adapters.comfy.compile` installs the compiled modules.
"""
from __future__ import annotations

import functools
import logging
import os
import types
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

SCOPES = ("regional", "whole", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor replays these as CUDA graphs
CALL_GRAPHS = ("off", "model call")  # ours: each whole model call replayed as one CUDA graph
MODULATION = ("precomputed", "per step")  # FLUX's modulation rows of a whole run in one pass, or per step


@dataclass(frozen=True)
class CompileSettings:
    """The user's settings: small and picklable (pool workers re-apply features from it)."""

    scope: str = "regional"
    mode: str = "default"
    dynamic: bool = True  # torch's automatic dynamic shapes: see compile_kwargs
    fullgraph: bool = False
    backend: str = "inductor"  # tests use "eager"/"aot_eager" to check guards without inductor's cost
    cuda_graph: str = "off"
    modulation: str = "precomputed"

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}, got {self.mode!r}")
        if self.cuda_graph not in CALL_GRAPHS:
            raise ValueError(f"cuda_graph must be one of {CALL_GRAPHS}, got {self.cuda_graph!r}")
        if self.modulation not in MODULATION:
            raise ValueError(f"modulation must be one of {MODULATION}, got {self.modulation!r}")
        if self.cuda_graph != "off" and self.mode in CUDA_GRAPH_MODES:
            raise ValueError(
                f"cuda_graph {self.cuda_graph!r} replays the whole model call as one CUDA graph, and mode "
                f"{self.mode!r} replays each block as its own: pick one (set mode to 'default', or cuda_graph "
                "to 'off').")

    @property
    def enabled(self) -> bool:
        return self.scope != "off"

    def missing_compiler(self, device_type: str, have_triton: bool) -> Optional[str]:
        """Why these settings cannot compile for `device_type`, or None: inductor writes its GPU
        kernels in Triton (which Linux torch wheels bring and Windows ones do not)."""
        if self.enabled and self.backend == "inductor" and device_type == "cuda" and not have_triton:
            return ("Compile Model: torch.compile needs triton to generate GPU kernels, and ComfyUI's Python "
                    "has none. On Linux it comes with torch; on Windows install the triton-windows package. "
                    "Or set scope to off.")
        return None

    @property
    def cuda_graphs(self) -> bool:
        return self.backend == "inductor" and self.mode in CUDA_GRAPH_MODES

    @property
    def call_graphs(self) -> bool:
        return self.enabled and self.cuda_graph == "model call"

    @property
    def modulation_table(self) -> bool:
        return self.enabled and self.modulation == "precomputed"

    def compile_kwargs(self) -> dict:
        # dynamic on (the default) -> torch's automatic dynamic shapes (None, as ComfyUI's
        # TorchCompileModel): the first shape compiles a specialized graph, the first change of a
        # size (resolution, batch, or the prompt's token count, which HunyuanVideo's text encoder
        # does not pad) one graph generic in that size, then no more.
        # dynamic off -> every new shape compiles its own specialized graph (every new prompt
        # length too; past torch's limit of 8 the blocks run eager).
        kwargs = dict(backend=self.backend, fullgraph=self.fullgraph, dynamic=None if self.dynamic else False)
        if self.backend == "inductor":  # the mode as its inductor options: torch.compile takes one or the other
            from torch._inductor import list_mode_options

            kwargs["options"] = {**list_mode_options(self.mode), **inductor_options()}
        return kwargs


def inductor_options() -> dict:
    """Our inductor options: the graph pass (one instance per process: compiled graphs keep a
    reference, and `folded` counts its rewrites) and inductor's multi-kernel reductions
    (`PARA_ATTN_MULTI_KERNEL`, default 0: off). With 1 inductor also makes a single-pass
    (persistent) variant of the row reductions over a hidden state (LayerNorm, modulation and
    fp8 quantization of 3072 values) and keeps the faster at the first call; 2 always takes the
    single-pass one. That once saved 1.5 ms of a 94 ms FLUX fp8 step (H100); now that our own
    kernels do those reductions it saves nothing (H200: 84.9 ms/step with 0, 1 and 2). Off by default: with torch 2.11 / triton 3.6 a compiled graph with
    multi-kernels fails to load from inductor's FX graph cache (`MultiKernelCall.cache_file_path`
    reads a JIT function's `_hash_lock`, None there), so the second process to compile the same
    blocks (ComfyUI after a restart) crashed."""
    return {"pre_grad_custom_pass": _fold_pass(), "triton.multi_kernel": _multi_kernel()}


@functools.cache
def _fold_pass():
    from .graph_folds import GraphFolds

    return GraphFolds()


def _multi_kernel() -> int:
    value = os.environ.get("PARA_ATTN_MULTI_KERNEL", "0")
    if value not in ("0", "1", "2"):
        raise ValueError(f"PARA_ATTN_MULTI_KERNEL must be 0, 1 or 2, got {value!r}")
    return int(value)


def repeated_block_names(root: torch.nn.Module) -> list[str]:
    """Dotted names of the blocks in every ModuleList child of `root` that repeats one class
    (Flux / HunyuanVideo: `double_blocks.i`, `single_blocks.i`; Wan: `blocks.i`). Containers
    are no blocks: a UNet's `input_blocks` hold `TimestepEmbedSequential`s, which ComfyUI
    iterates rather than calls (a compiled one cannot be iterated)."""
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    names = []
    for list_name, child in root.named_children():
        if (isinstance(child, torch.nn.ModuleList) and len(child) >= 2 and len({type(b) for b in child}) == 1
                and not isinstance(child[0], containers)):
            names += [f"{list_name}.{i}" for i in range(len(child))]
    return names


class _Wrapper(torch.nn.Module):
    """A module around another (`inner` names it) that answers the attribute lookups it cannot
    with the inner module's: the block's own, the whole model's `dtype`, `_orig_mod`, ..."""

    inner = "block"

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == self.inner:  # not set (yet): no recursion
                raise
            return getattr(super().__getattr__(self.inner), name)


class GraphSafeInputs(_Wrapper):
    """Calls a block with copies of its tensor arguments, inside the compiled region.

    Inductor replays a graph as a CUDA graph only if it mutates none of its inputs, and
    ComfyUI's FLUX / HunyuanVideo blocks add their residual in place (`x += ...`). With the
    copy inside the graph, the mutation is of a graph-internal buffer. Only used for the
    CUDA-graph modes.
    """

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return self.block(*args, **kwargs)


class FreshTrace(_Wrapper):
    """Calls a block: a module of its own, so that a `fullgraph` compile traces the block anew.

    Dynamo keeps its compiled code per code object and reuses an entry whose guards pass; the
    inductor backends of two settings that differ only in `fullgraph` compare equal, so a
    fullgraph compile of a block compiled before without it ran the earlier entries (with their
    graph breaks) and never reported a break. This module's frame has no such entries.
    Made per block class by `wrap_block`.
    """

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return self.block(*args, **kwargs)


_wrapper_classes: dict = {}  # (wrapper class, block class) -> the wrapper's subclass for it


def wrap_block(wrapper: type, block: torch.nn.Module) -> torch.nn.Module:
    """`wrapper(block)`, as a subclass of `wrapper` for the block's class whose `forward` has a
    code object of its own. Dynamo keeps at most 8 compiled entries per code object (past that
    a fullgraph compile fails, any other runs eager): one `forward` shared by every block class
    of every model would give them all one budget, where each block class had its own."""
    key = (wrapper, type(block))
    if key not in _wrapper_classes:
        forward = wrapper.forward
        code = forward.__code__.replace(co_name=f"forward_{type(block).__name__}")
        own = types.FunctionType(code, forward.__globals__, code.co_name, forward.__defaults__, forward.__closure__)
        _wrapper_classes[key] = type(f"{wrapper.__name__}_{type(block).__name__}", (wrapper,), {"forward": own})
    return _wrapper_classes[key](block)


class FullgraphBreak(RuntimeError):
    """A block compiled with `fullgraph` on broke its graph."""


class NamedGraphBreaks(_Wrapper):
    """Calls a block compiled with `fullgraph` on; dynamo's error at a graph break (raised on the
    sampler node, naming neither Compile Model nor the setting) becomes one that does."""

    inner = "compiled"

    def __init__(self, compiled: torch.nn.Module, block_class: str):
        super().__init__()
        self.compiled = compiled
        self.block_class = block_class

    def forward(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:
            # Raised instead of running eagerly once a fullgraph compile passes the recompile limit.
            if isinstance(exc, getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())):
                raise FullgraphBreak(
                    f"Compile Model (fullgraph on): torch reached its recompile limit for {self.block_class}, and "
                    "with fullgraph it cannot run the block uncompiled. Restart ComfyUI, or turn fullgraph off.") from exc
            if not isinstance(exc, torch._dynamo.exc.Unsupported):
                raise
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FullgraphBreak(
                f"Compile Model (fullgraph on): {self.block_class} cannot be compiled as one graph: {reason}. Turn "
                "fullgraph off (the block then compiles in pieces around what torch cannot trace; on CPU, ComfyUI's "
                "default attention is such a piece).") from exc


class DetachedInputs(_Wrapper):
    """Calls a compiled block with its tensor arguments detached from their view bases and
    in standard strides.

    With dynamic shapes dynamo guards on a view's base sizes and on strides: the first block
    gets a view of the embedder's output, the others fresh tensors, so one block class would
    compile two graphs for every shape. `detach()` (no copy; inference only, no grad) makes
    the bases alike; `contiguous()` the strides, copying only a tensor that is not already
    contiguous (newer ComfyUI's Wan hands its first block `x.flatten(2).transpose(1, 2)`: one
    copy of the hidden state per model call). Only used when `dynamic` is on: static graphs
    compile per shape anyway.
    """

    inner = "compiled"

    def __init__(self, compiled: torch.nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.compiled(*args, **kwargs)
        args = [a.detach().contiguous() if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: v.detach().contiguous() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return self.compiled(*args, **kwargs)


# root module -> {(names, settings): compiled modules}. Wrapping 57 FLUX blocks in
# torch.compile costs ~80 ms of Python; pool workers re-apply Compile on every prompt.
_compiled_cache: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def compile_modules(root: torch.nn.Module, names: list[str], settings: CompileSettings) -> dict:
    """{name: torch.compile(root.get_submodule(name))}; compilation itself is lazy (first call).
    The same root, names and settings get the same wrappers back."""
    key = (tuple(names), settings)
    cached = _compiled_cache.setdefault(root, {})
    if key not in cached:
        kwargs = settings.compile_kwargs()
        wrappers = [w for w, used in ((GraphSafeInputs, settings.cuda_graphs), (FreshTrace, settings.fullgraph)) if used]

        def wrap(module):
            for wrapper in wrappers:
                module = wrap_block(wrapper, module)
            return module

        compiled = {name: torch.compile(wrap(root.get_submodule(name)), **kwargs) for name in names}
        if settings.fullgraph:
            compiled = {name: NamedGraphBreaks(module, type(root.get_submodule(name)).__name__)
                        for name, module in compiled.items()}
        if settings.dynamic:
            compiled = {name: DetachedInputs(module) for name, module in compiled.items()}
        cached[key] = compiled
    return dict(cached[key])


class _RecompileLimitNotice(logging.Filter):
    """Sees dynamo's "hit config.recompile_limit" warning (it lets every record through) and
    says once per function, in Compile Model's words, what it means: torch has stopped
    compiling that code and runs it eagerly for the rest of the process."""

    said: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("torch._dynamo hit config.") and record.args:
            function = record.args[2] if len(record.args) > 2 else "?"
            if function not in self.said:
                self.said.add(function)
                logging.getLogger("comfy_para_attn").warning(
                    "Compile Model: torch reached its limit of %s compiled graphs for %s and runs it uncompiled from "
                    "now on in this process. Each change of Compile Model or FP8 settings, LoRA set or batch size "
                    "above 1 can cost a graph per block class. Restart ComfyUI to compile again, or raise "
                    "torch._dynamo.config.recompile_limit.", record.args[1], function)
        return True


def watch_recompile_limit() -> None:
    """Install the notice on dynamo's logger (once)."""
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _RecompileLimitNotice) for f in logger.filters):
        logger.addFilter(_RecompileLimitNotice())


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process (for tests and benchmarks)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def block_classes(root: torch.nn.Module, names: list[str]) -> set[type]:
    return {type(root.get_submodule(n)) for n in names}


def describe(root: Optional[torch.nn.Module], names: list[str]) -> str:
    if root is None or not names:
        return "whole model"
    classes = sorted(c.__name__ for c in block_classes(root, names))
    return f"{len(names)} blocks of {len(classes)} class(es): {', '.join(classes)}"
