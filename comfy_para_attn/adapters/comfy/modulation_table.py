"""Compile Model's `modulation = "precomputed"` for ComfyUI's FLUX (`modulation_table.py`).

At a run's first model call the FLUX vector `vec` is made for every sigma of the run's
schedule (`transformer_options["sample_sigmas"]`) with the call's conds, by the model's own
embedders, the way `Flux.forward_orig` makes it; each modulation layer then computes the rows
of all steps in one matmul. Each call picks its step's rows on the GPU (the host never waits
for it) and records there whether its sigma and conds were the table's. A SAMPLER_SAMPLE
wrapper reads that record once, at the end of the run; if some call was not covered (a
sampler that evaluates between the schedule's sigmas, conds other than the table's), the run
is sampled again without the table, and a sampler found between sigmas does without it from
then on. Samplers known to evaluate between sigmas (`BETWEEN_SIGMAS`) skip it from the start.
The check sees the sigma and conds as Compile Model's wrapper gets them, so anything that
could change them on the way to the blocks rules the table out.

Left out (they compute as before, the reason logged once): models other than FLUX itself
(the embedders' formula is FLUX's), other packs' model wrappers (they may change the model's
inputs; Context Parallel's cfg split too) and block patches (they may hand the blocks another
`vec`), hooks (scheduled LoRAs change weights during a run), gradients, tables over
`MAX_TABLE_BYTES`. A pack that changes the weights during a run by other means than hooks
would be served rows of the old weights.
"""
from __future__ import annotations

import logging

import torch

from ...modulation_table import ModulationTable, detach, table_class
from ...quant.modulation import modulation_layers
from .call_graphs import APPLY_MODEL_ARGS, other_model_wrappers, why_not_fixed
from .patches import ChainedBlockPatch, compute_dtype

CALLBACK_KEY = "para_attn_modulation_table"
MAX_TABLE_BYTES = 1 << 30  # FLUX.1-dev: 2.1 MB per step and image
MAX_TABLES = 4  # per run: one per batch of conds (cond and uncond batched, or each alone)

log = logging.getLogger(__name__)


def flux_model(dm) -> bool:
    """ComfyUI's FLUX.1 itself: subclasses may make `vec` their own way, and newer ComfyUI's
    FLUX.2 (the same class) has no pooled-text embedder and modulates once for all blocks."""
    from comfy.ldm.flux.model import Flux

    params = getattr(dm, "params", None)
    return (type(dm) is Flux and getattr(dm, "vector_in", None) is not None
            and not getattr(params, "global_modulation", False))


def object_patches(model_patcher) -> dict:
    """{"diffusion_model.<layer>.__class__": class with TableForward} for a FLUX model, composed
    with a class already patched there (FP8 Quantize's int8 modulation); {} for other models."""
    dm = model_patcher.model.diffusion_model
    if not flux_model(dm):
        return {}
    out = {}
    for name, module in modulation_layers(dm):
        key = f"diffusion_model.{name}.__class__"
        own = type(module)  # another clone's patched class while the model is loaded
        current = model_patcher.object_patches.get(key, getattr(own, "_para_attn_base", own))
        out[key] = table_class(current)
    return out


def flux_layer_inputs(base_model, sigmas: torch.Tensor, y, guidance) -> torch.Tensor:
    """silu(vec) [steps, batch, dim] for every sigma of `sigmas` with the batch's conds, as
    `BaseModel._apply_model` and `Flux.forward_orig` make it."""
    from comfy.ldm.flux.layers import timestep_embedding
    from comfy.model_base import convert_tensor

    dm = base_model.diffusion_model
    dtype = compute_dtype(base_model)
    batch, device = y.shape[0], y.device
    steps = sigmas.shape[0]
    t = base_model.model_sampling.timestep(sigmas.to(device)).float().repeat_interleave(batch)
    vec = dm.time_in(timestep_embedding(t, 256).to(dtype))
    if dm.params.guidance_embed and guidance is not None:
        g = convert_tensor(guidance, dtype, device).repeat(steps)
        vec = vec + dm.guidance_in(timestep_embedding(g, 256).to(dtype))
    y = convert_tensor(y, dtype, device)[:, :dm.params.vec_in_dim].repeat(steps, 1)
    vec = vec + dm.vector_in(y)
    return torch.nn.functional.silu(vec).reshape(steps, batch, -1)


def _ours(patch) -> bool:
    if isinstance(patch, ChainedBlockPatch):
        return _ours(patch.outer) and _ours(patch.inner)
    module = getattr(patch, "__module__", None) or type(patch).__module__
    return module.startswith("comfy_para_attn")


def why_no_table(base_model, args: tuple, kwargs: dict, own_wrapper_key: str) -> str | None:
    """None if this APPLY_MODEL call may use a table, else the reason. The table is chosen
    from the call's sigma and conds as our wrapper sees them, so nothing between it and the
    model may change them: other packs' model wrappers and block patches rule it out."""
    from comfy.model_base import BaseModel

    if not flux_model(base_model.diffusion_model) or type(base_model).process_timestep is not BaseModel.process_timestep:
        return f"{type(base_model.diffusion_model).__name__} ({type(base_model).__name__}) is not FLUX"
    if len(args) != len(APPLY_MODEL_ARGS) or not isinstance(args[5], dict) or not isinstance(kwargs.get("y"), torch.Tensor):
        return "an unexpected apply_model call"
    options = args[5]
    if not isinstance(options.get("sample_sigmas"), torch.Tensor):
        return "no sigma schedule in transformer_options"
    wrappers = other_model_wrappers(options, own_wrapper_key, lambda fn: getattr(fn, "keeps_model_inputs", False))
    if wrappers:
        return f"other model wrappers may change the model's inputs ({', '.join(map(str, wrappers))})"
    foreign = [k for k, p in options.get("patches_replace", {}).get("dit", {}).items() if not _ours(p)]
    if foreign:
        return "another node's block patches may change what the blocks are given"
    return why_not_fixed(base_model)


# Samplers (their function's name) that evaluate the model between the schedule's sigmas
# (midpoints, their own step sizes): with a table, every run would be sampled twice.
BETWEEN_SIGMAS = ("sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                  "sample_dpmpp_2s_ancestral_cfg_pp", "sample_dpmpp_sde", "sample_dpmpp_sde_gpu",
                  "sample_seeds_2", "sample_seeds_3", "dpm_fast_function", "dpm_adaptive_function")
# Samplers found doing so in this process (other packs' samplers): every Compile Model node's
# tables skip them from then on, not only the instance that found one.
between_sigmas_found: set = set()


def table_sigmas(base_model, schedule: torch.Tensor) -> torch.Tensor:
    """The schedule's sigmas, plus the first one as the SDE samplers of flow models move it
    (ComfyUI's offset_first_sigma_for_snr: 1.0 -> 0.99997 for a finite logSNR), so that their
    first call finds its row instead of sampling the run again."""
    from comfy.k_diffusion.sampling import offset_first_sigma_for_snr

    moved = offset_first_sigma_for_snr(schedule, base_model.model_sampling)
    if moved is schedule or bool(moved[0] == schedule[0]):
        return schedule
    return torch.cat((schedule, moved[:1]))


class _Entry:
    """A table for one batch of conds, and whether some call it served had a sigma, or conds,
    that were not the table's."""

    def __init__(self, table: ModulationTable, y: torch.Tensor, guidance):
        self.table, self.y, self.guidance = table, y, guidance
        device = table.current.device
        self.missed_sigma = torch.zeros((), dtype=torch.bool, device=device)
        self.missed_conds = torch.zeros((), dtype=torch.bool, device=device)

    def select(self, sigma: torch.Tensor, y: torch.Tensor, guidance) -> None:
        self.missed_sigma.logical_or_(self.table.select(sigma))
        conds = (y != self.y).any()
        if guidance is not None:  # shapes: the entry's key
            conds = conds | (guidance != self.guidance).any()
        self.missed_conds.logical_or_(conds)


class ModulationRows:
    """The tables of one Compile Model wrapper: per run (SAMPLER_SAMPLE), one per batch of conds."""

    def __init__(self, own_wrapper_key: str):
        self.own_wrapper_key = own_wrapper_key  # Compile Model's APPLY_MODEL wrapper
        self._active = False  # between `run`'s start and end, for a sampler that may use a table
        self._entries: dict = {}  # (shapes, cond_or_uncond, cond ids) -> _Entry, or None: refused
        self._current = None  # kept across runs: a CUDA graph reads the rows there
        self._logged = set()

    def _note(self, reason: str) -> None:
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("Compile Model: modulation computed per step: %s", reason)

    def run(self, executor, *args, **kwargs):
        """SAMPLER_SAMPLE wrapper: a run with tables, sampled again without them if some call
        was not covered."""
        function = getattr(executor.class_obj, "sampler_function", type(executor.class_obj))
        name = getattr(function, "__name__", type(executor.class_obj).__name__)
        self._begin(active=name not in between_sigmas_found and name not in BETWEEN_SIGMAS)
        try:
            out = executor(*args, **kwargs)
            entries = [e for e in self._entries.values() if e is not None]
            # one wait for the GPU, at the end of the run
            sigma = any(bool(e.missed_sigma) for e in entries)
            if sigma or any(bool(e.missed_conds) for e in entries):
                if sigma:
                    between_sigmas_found.add(name)
                what = (f"{name} evaluates the model between the schedule's sigmas (it does without the "
                        "table from now on)" if sigma else "a call's conds were not those its table was made for")
                log.warning("Compile Model: %s; sampling again with the modulation computed per step", what)
                self._begin(active=False)
                out = executor(*args, **kwargs)
            return out
        finally:
            self._begin(active=False)

    def _begin(self, active: bool) -> None:
        self._entries, self._active = {}, active

    def enter(self, base_model, args: tuple, kwargs: dict):
        """The table attached for this call (its step's rows selected), or None."""
        if not self._active:
            return None
        reason = why_no_table(base_model, args, kwargs, self.own_wrapper_key)
        if reason is not None:
            self._note(reason)
            return None
        x, sigma, options = args[0], args[1], args[5]
        y, guidance = kwargs["y"], kwargs.get("guidance")
        if not isinstance(sigma, torch.Tensor) or sigma.shape != (x.shape[0],) or y.shape[0] != x.shape[0]:
            return None
        # The batch's conds by ComfyUI's ids: area conds, or conds active for part of the run,
        # make batches of other conds under the same shapes.
        key = (tuple(y.shape), None if guidance is None else tuple(guidance.shape),
               tuple(options.get("cond_or_uncond", ())), tuple(map(str, options.get("uuids", ()))))
        if key not in self._entries:  # None: refused for this run (its reason noted once)
            self._entries[key] = self._build(base_model, options["sample_sigmas"], y, guidance)
        entry = self._entries[key]
        if entry is None:
            return None
        entry.select(sigma, y, guidance)
        entry.table.attach()
        return entry.table

    def _build(self, base_model, schedule, y, guidance):
        if sum(e is not None for e in self._entries.values()) >= MAX_TABLES:
            self._note(f"more than {MAX_TABLES} batches of conds in a run")
            return None
        layers = modulation_layers(base_model.diffusion_model)
        schedule = table_sigmas(base_model, schedule)
        steps, batch = schedule.shape[0], y.shape[0]
        dtype = compute_dtype(base_model)
        nbytes = steps * batch * sum(m.out_features for _, m in layers) * torch.finfo(dtype).bits // 8
        if nbytes > MAX_TABLE_BYTES:
            self._note(f"{steps} steps x {batch} images of rows would take {nbytes / 2**30:.1f} GiB")
            return None
        with torch.no_grad():
            inputs = flux_layer_inputs(base_model, schedule, y, guidance)
            table = ModulationTable(layers, inputs, schedule, self._current)
        self._current = table.current
        return _Entry(table, y.clone(), None if guidance is None else guidance.clone())

    def exit(self, table) -> None:
        if table is not None:
            detach(table.layers)

    def register(self, model_patcher) -> None:
        import comfy.patcher_extension as ext

        def on_detach(patcher, unpatch_all=True):
            if unpatch_all:  # the model is unloaded: the buffer goes too
                self._current = None

        model_patcher.remove_callbacks_with_key(ext.CallbacksMP.ON_DETACH, CALLBACK_KEY)
        model_patcher.add_callback_with_key(ext.CallbacksMP.ON_DETACH, CALLBACK_KEY, on_detach)
        sampler_sample = ext.WrappersMP.SAMPLER_SAMPLE
        model_patcher.remove_wrappers_with_key(sampler_sample, CALLBACK_KEY)
        model_patcher.add_wrapper_with_key(sampler_sample, CALLBACK_KEY, self.run)
        for key, cls in object_patches(model_patcher).items():
            model_patcher.add_object_patch(key, cls)


def unregister(model_patcher) -> None:
    """Remove the callbacks and give each layer back the class it had before ours."""
    import comfy.patcher_extension as ext

    from ...modulation_table import TableForward

    model_patcher.remove_callbacks_with_key(ext.CallbacksMP.ON_DETACH, CALLBACK_KEY)
    model_patcher.remove_wrappers_with_key(ext.WrappersMP.SAMPLER_SAMPLE, CALLBACK_KEY)
    for key, value in list(model_patcher.object_patches.items()):
        if isinstance(value, type) and issubclass(value, TableForward):
            under = value.__bases__[1]  # table_class(under)
            if hasattr(under, "_para_attn_base"):
                model_patcher.object_patches[key] = under  # FP8 Quantize's class stays
            else:
                del model_patcher.object_patches[key]
