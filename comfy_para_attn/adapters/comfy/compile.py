"""Compile Model for ComfyUI diffusion models: regional (each repeated block class once) or
whole-model torch.compile, installed the way ComfyUI's TorchCompileModel does it.

Hook (no forward function is copied): a keyed `APPLY_MODEL` wrapper swaps the compiled
modules in for the duration of each model call and puts the originals back afterwards
(ComfyUI's `comfy_api.torch_helpers.set_torch_compile_wrapper` pattern, with our own key).
The base model's modules are never replaced permanently, so other clones run eager.

Block patches (First Block Cache's decision, context-parallel sharding and gathering) wrap
the *call* of each block from the model's block loop, so with regional scope they run eager
around the compiled blocks, in any order of the nodes. Weights are graph inputs, so a LoRA
merged into them or an fp8 re-quantization needs no recompile.

Settings live in `transformer_options["para_attn"]["compile"]` (a picklable
`CompileSettings`); pool workers re-apply them. ComfyUI's own TorchCompileModel wrapper is
removed from the clone (compiling the model twice would nest two compilers).
"""
from __future__ import annotations

import importlib.util
import logging

from ...compile import CompileSettings, compile_modules, describe, repeated_block_names, watch_recompile_limit
from .call_graphs import ModelCallGraphs, unregister as unregister_call_graphs
from .device_conds import keep_conds_on_device
from .modulation_table import ModulationRows, unregister as unregister_modulation_table

FEATURE = "compile"
WRAPPER_KEY = "para_attn_compile"
COMFY_COMPILE_KEY = "torch.compile"  # ComfyUI's TorchCompileModel wrapper key

log = logging.getLogger(__name__)


class CompiledModulesWrapper:
    """APPLY_MODEL wrapper: `{attribute path on BaseModel: compiled module}` swapped in per call."""

    def __init__(self, compiled: dict, cuda_graphs: bool = False, call_graphs=None, modulation=None):
        self.compiled = compiled
        self.cuda_graphs = cuda_graphs
        self.call_graphs = call_graphs  # a ModelCallGraphs: whole calls replayed as CUDA graphs
        self.modulation = modulation  # a ModulationRows: the run's modulation rows, precomputed

    def __call__(self, executor, *args, **kwargs):
        # The table's rows are chosen here, outside any CUDA graph of the call: a graph reads
        # them from one buffer, and its key says whether the call had them.
        table = self.modulation.enter(executor.class_obj, args, kwargs) if self.modulation is not None else None
        try:
            if self.call_graphs is not None:
                run = lambda *a, **k: self._run(executor, *a, **k)  # noqa: E731
                key = None if table is None else ("modulation rows", table.current.data_ptr())
                return self.call_graphs(run, executor.class_obj, args, kwargs, extra=key)
            return self._run(executor, *args, **kwargs)
        finally:
            if table is not None:
                self.modulation.exit(table)

    def _run(self, executor, *args, **kwargs):
        import comfy.utils
        import torch

        if self.cuda_graphs:  # each model call is a new replay of the blocks' CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()

        _unspecialize_schedule(args[5] if len(args) > 5 else kwargs.get("transformer_options"))
        base_model = executor.class_obj
        originals = {}
        try:
            for key, module in self.compiled.items():
                originals[key] = comfy.utils.get_attr(base_model, key)
                comfy.utils.set_attr(base_model, key, module)
            return executor(*args, **kwargs)
        finally:
            for key, module in originals.items():
                comfy.utils.set_attr(base_model, key, module)

    def __repr__(self):
        return f"CompiledModulesWrapper({len(self.compiled)} modules)"


def _unspecialize_schedule(transformer_options) -> None:
    """Blocks get `transformer_options`, which holds the prompt's whole sigma schedule. Where
    attention breaks the graph (ComfyUI's sub-quadratic kernel on CPU, some other packs'
    kernels) dynamo guards on that tensor's length, so every new step count compiled every
    block class again, and after 8 counts the blocks silently ran eager. Its length is
    marked dynamic: no block reads it."""
    import torch

    sigmas = transformer_options.get("sample_sigmas") if isinstance(transformer_options, dict) else None
    if isinstance(sigmas, torch.Tensor) and sigmas.ndim == 1:
        torch._dynamo.maybe_mark_dynamic(sigmas, 0)


def compile_targets(model_patcher, scope: str) -> list[str]:
    """Attribute paths (relative to the diffusion model) that `scope` compiles."""
    dm = model_patcher.model.diffusion_model
    if scope == "whole":
        return []
    names = repeated_block_names(dm)
    if not names:
        raise ValueError(
            f"Compile Model (regional) found no repeated transformer blocks in {type(dm).__name__} (no "
            "ModuleList of one block class). Use scope 'whole' for this model.")
    return names


def apply_compile(model_patcher, settings: CompileSettings):
    """Return a clone of `model_patcher` that runs compiled per `settings`.

    The single entry point for the node and for pool workers. Applying it again replaces the
    earlier compile wrapper. scope "off" removes ours (and nothing else). Compilation itself
    happens at the first model call.
    """
    import comfy.patcher_extension

    problem = settings.missing_compiler(model_patcher.load_device.type, importlib.util.find_spec("triton") is not None)
    if problem:
        raise RuntimeError(problem)
    apply_model = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    model = model_patcher.clone()
    keep_conds_on_device(model)
    to = model.model_options.setdefault("transformer_options", {})
    to["para_attn"] = {**to.get("para_attn", {}), FEATURE: settings}
    model.remove_wrappers_with_key(apply_model, WRAPPER_KEY)
    unregister_call_graphs(model)
    unregister_modulation_table(model)
    if not settings.enabled:
        return model
    if model.get_wrappers(apply_model, COMFY_COMPILE_KEY):
        logging.info("Compile Model: replacing the TorchCompileModel compile of this model with ours")
        model.remove_wrappers_with_key(apply_model, COMFY_COMPILE_KEY)
    watch_recompile_limit()
    dm = model.model.diffusion_model
    names = compile_targets(model, settings.scope)
    compiled = compile_modules(dm, names, settings) if names else compile_modules(model.model, ["diffusion_model"],
                                                                                 settings)
    prefixed = {name if not names else f"diffusion_model.{name}": module for name, module in compiled.items()}
    graphs = ModelCallGraphs(WRAPPER_KEY) if settings.call_graphs else None
    if graphs is not None:
        graphs.register(model)
    rows = ModulationRows(WRAPPER_KEY) if settings.modulation_table else None
    if rows is not None:
        rows.register(model)
    model.add_wrapper_with_key(apply_model, WRAPPER_KEY,
                               CompiledModulesWrapper(prefixed, settings.cuda_graphs, graphs, rows))
    log.debug("Compile Model: %s (%s)", describe(dm if names else None, names), settings)
    return model
