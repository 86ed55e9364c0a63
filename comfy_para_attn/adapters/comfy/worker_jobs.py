"""Worker side of Context Parallel: jobs that run inside the pool's worker processes.

`init_worker` makes ComfyUI importable with the server's settings (before
comfy.model_management is imported). `sample` rebuilds the model (cached by weight
fingerprint), applies the job's weight patches and our features, installs context
parallelism and runs ComfyUI's own sampling code. Rank 0 streams progress and returns the
final latent; every rank checks the interrupt flag at each step boundary (collectively).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import logging
import os
import time

import torch

SENT_ONCE_KEY = ("sent_once", "sample")  # the last sampling job's large tensors (pool.sent_once)
CONTROLNETS_KEY = ("controlnets", "loaded")  # the last prompt's ControlNet models (controlnets.keep_loaded_models)
FEATURE_ORDER = ("attention_backend", "fp8", "compile", "first_block_cache")  # context parallelism goes last (outermost)


def init_worker(ctx, payload):
    from .env import make_importable

    cli_args = dict(payload["cli_args"])
    cli_args["cuda_device"] = None  # each worker sees exactly its own GPU
    make_importable(payload["comfy_path"], cli_args=cli_args)
    import comfy.model_management  # noqa: F401  reads the settings above at import

    ctx.cache["comfy_ready"] = True


def _apply_features(patcher, settings: dict):
    """Re-apply our single-GPU features from their settings, in a fixed order."""
    from . import features

    for name in FEATURE_ORDER:
        if name in settings:
            patcher = features.apply(name, patcher, settings[name])
    return patcher


def config_key(model_config, model_type) -> str:
    """What besides the weights decides the model a worker builds: ComfyUI's model config
    (its class, unet_config, optimizations such as UNETLoader's fp8_e4m3fn_fast, manual cast
    dtype, custom operations, newer ComfyUI's per-layer quantization) and the model type. Same
    weights, another config: another model."""
    parts = [type(model_config).__module__, type(model_config).__qualname__]
    parts += [repr(_config_value(model_config, name))
              for name in ("unet_config", "optimizations", "manual_cast_dtype", "custom_operations", "quant_config")]
    return hashlib.sha1("|".join(parts + [repr(model_type)]).encode()).hexdigest()


def _config_value(model_config, name: str):
    """`model_config.name`, None where it has none, without its `__getattr__` (newer ComfyUI's
    logs a warning for every missing name)."""
    for owner in (model_config, *type(model_config).__mro__):
        if name in vars(owner):
            return vars(owner)[name]
    return None


def _model_key(payload) -> tuple:
    return "model", payload["fingerprint"], config_key(payload["model_config"], payload["model_type"])


def drop_cached(ctx, spec) -> int:
    """Forget this rank's cached models of a kind and free their memory; returns how many were
    dropped. `spec`: "model" / "vae" (all of that kind), or (kind, fingerprint) for one model's
    weights (`published.unmap_in_workers`)."""
    kind, fingerprint = (spec, None) if isinstance(spec, str) else spec
    if kind == "model" and fingerprint is None:  # ComfyUI unloaded all models: the controller forgot them too
        ctx.cache.pop(SENT_ONCE_KEY, None)
        ctx.cache.pop(CONTROLNETS_KEY, None)
    return _drop(ctx, [key for key in ctx.cache if isinstance(key, tuple) and key[0] == kind
                       and (fingerprint is None or key[1] == fingerprint)])


def _drop(ctx, keys: list) -> int:
    import comfy.model_management

    for key in keys:
        del ctx.cache[key]
    comfy.model_management.cleanup_models()
    gc.collect()  # a model's modules hold reference cycles
    comfy.model_management.soft_empty_cache()
    return len(keys)


def _base_model(ctx, payload, key: tuple):
    """The unpatched ModelPatcher for the job's weights and model config, built once per
    (fingerprint, config): `key`, from `_model_key`."""
    import comfy.model_management
    import comfy.model_patcher

    from ...pool import transfer

    cached = ctx.cache.pop(key, None)
    if cached is not None:
        ctx.cache[key] = cached  # most recently used last
        return cached
    # As many models as the controller keeps in shared memory (it makes us drop the ones it
    # evicts); the least recently used first should the two ever disagree.
    models = [k for k in ctx.cache if isinstance(k, tuple) and k[0] == "model"]
    _drop(ctx, models[:max(0, len(models) - payload.get("keep_models", 1) + 1)])
    ctx.heartbeat()
    weights = transfer.load_tensors(payload["weights"])
    model_config = payload["model_config"]
    model = model_config.get_model({}, "", device=None)
    model.diffusion_model.load_state_dict(weights, strict=True, assign=True)
    model.model_type = payload["model_type"]
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device())
    ctx.cache[key] = patcher
    return patcher


class _Captured(logging.Handler):
    """Collects this job's INFO log lines (e.g. the cache summary) for the ComfyUI log."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _profiler_if_asked(steps: int):
    """A torch profiler over this prompt's sampling when the workers' environment has
    `PARA_ATTN_PROFILE=N` and the prompt has N steps (a diagnostic: it slows the host)."""
    if os.environ.get("PARA_ATTN_PROFILE") != str(steps):
        return None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _note_first_model_call(patcher, first_call: list) -> None:
    """Append the time of the first model call to `first_call` (an APPLY_MODEL wrapper on
    this prompt's clone): how long ComfyUI's sampler setup takes shows in the log."""
    import comfy.patcher_extension

    def wrapper(executor, *args, **kwargs):
        if not first_call:
            first_call.append(time.monotonic())
        return executor(*args, **kwargs)

    wrapper.keeps_model_inputs = True  # see CfgSplitWrapper.keeps_model_inputs
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "para_attn_timing", wrapper)


def sample(ctx, payload):
    from ...attention import build_parallel_context
    from ...attention.local import select_backend
    from .context_parallel import install_context_parallel
    from .controlnets import keep_loaded_models, rebuild_controls
    from .portable import rebuild_guider, rebuild_sampler
    from .vae_jobs import cached_vae

    from ...pool.sent_once import ReceivedTensors, unpack

    began = time.monotonic()
    received = ctx.cache.get(SENT_ONCE_KEY)
    if received is None:
        received = ctx.cache[SENT_ONCE_KEY] = ReceivedTensors()
    # The setup is local work on each rank, run as agreed steps: a failure there (a class the
    # workers cannot import, a model that does not load, out of memory while loading) fails
    # the prompt on every rank together and keeps the pool with its cached models.
    payload = ctx.run_agreed(lambda: unpack(payload, received))
    settings = payload["settings"]
    cp_key = ("cp", settings.config)
    if cp_key not in ctx.cache:  # process groups are created once per layout (collective)
        ctx.cache[cp_key] = build_parallel_context(settings.config)
    cp = ctx.cache[cp_key]
    key = _model_key(payload)
    cached = key in ctx.cache
    timings = {}

    def set_up():
        patcher = _base_model(ctx, payload, key).clone()
        timings["model_ready"] = time.monotonic()
        patcher.patches = {k: list(v) for k, v in payload["patches"].items()}
        patcher.patches_uuid = payload["patches_uuid"]
        patcher.force_cast_weights = payload.get("force_cast_weights", False)
        patcher.weight_wrapper_patches = {k: list(v) for k, v in payload.get("weight_wrapper_patches", {}).items()}
        patcher.object_patches = dict(payload["object_patches"])
        patcher.model_options = payload["model_options"]
        ours = patcher.model_options.get("transformer_options", {}).get("para_attn", {})
        patcher = _apply_features(patcher, ours)
        select_backend(settings.attention_backend)  # the Context Parallel node's choice wins in the workers
        patcher = install_context_parallel(patcher, cp)
        guider_cls, guider_state = payload["guider"]
        _note_first_model_call(patcher, first_call)
        conds = rebuild_controls(payload["conds"], lambda recipe: cached_vae(ctx, recipe))
        controlnets = keep_loaded_models(conds, ctx.cache.setdefault(CONTROLNETS_KEY, {}))
        return rebuild_guider(guider_cls, guider_state, patcher, conds), controlnets

    first_call = []  # when ComfyUI's sampler setup (loading the model, conds) ended
    guider, controlnets = ctx.run_agreed(set_up)
    model_ready = timings["model_ready"]
    prepared = time.monotonic()

    first_step = []

    x0_every_step = payload.get("x0_every_step", True)
    unsent = {}  # the latest denoised latent not yet sent (rank 0, previews off)

    def callback(step, x0, x, total_steps):
        if not first_step:
            first_step.append(time.monotonic())
        ctx.check_interrupt()  # collective on the host: every rank stops at the same step
        if ctx.rank == 0:
            # Copying the denoised latent to the host waits for the GPU to finish the step, and
            # a drained GPU then idles while the next step's first kernels are launched: every
            # step only for previews; otherwise once, after sampling (below).
            wanted = x0 is not None and x0_every_step
            unsent.clear()
            if x0 is not None and not wanted:
                unsent.update(step=step, total=total_steps, x0=x0.detach())
            ctx.report_progress(step, total_steps, x0=x0.detach().cpu() if wanted else None)

    captured = _Captured()
    root = logging.getLogger()
    root.addHandler(captured)
    old_level = root.level
    root.setLevel(min(old_level, logging.INFO))
    steps = max(1, len(payload["sigmas"]) - 1)
    profiler = _profiler_if_asked(steps)
    try:
        # ComfyUI samples under its executor's inference_mode. Its models' weights require grad,
        # and some samplers (uni_pc, uni_pc_bh2, ipndm) do not turn autograd off themselves: here
        # they would record every model call's graph (its activations kept until the step ends).
        with torch.no_grad(), profiler or contextlib.nullcontext():
            samples = guider.sample(payload["noise"], payload["latent_image"], rebuild_sampler(payload["sampler"]),
                                    payload["sigmas"],
                                    payload["denoise_mask"], callback, True, payload["seed"])
    finally:
        root.removeHandler(captured)
        root.setLevel(old_level)
    if unsent:  # the last callback's latent: SamplerCustom(Advanced) outputs it as "denoised"
        ctx.report_progress(unsent["step"], unsent["total"], x0=unsent["x0"].cpu())
    done = time.monotonic()
    first = first_step[0] if first_step else done
    setup = first_call[0] - prepared if first_call else float("nan")
    if profiler is not None:
        from ...profiling import describe

        sampling = done - (first_call[0] if first_call else prepared)  # not the sampler setup (a first load)
        captured.lines += [f"Context Parallel rank {ctx.rank} {line}" for line in describe(profiler, steps, sampling)]
    # Where a slow first prompt goes: weights from shm, then the first step (moving weights to
    # the GPU, compiling, autotuning), then the rest.
    captured.lines.append(
        f"Context Parallel rank {ctx.rank}: model {'cached' if cached else 'loaded'} in {model_ready - began:.2f} s, "
        f"features installed in {prepared - model_ready:.3f} s, sampler set up in {setup:.3f} s, "
        f"first step {first - prepared:.2f} s, "
        f"{steps - 1} more in {done - first:.2f} s"
        + (", ControlNet models: {} kept from the last prompt ({} still loaded), {} new".format(*controlnets)
           if any(controlnets) else ""))
    report = (captured.lines, received.changed_since_unpack())
    reports = [report]
    if ctx.world_size > 1:  # every rank's log (e.g. each rank's cache summary) goes back
        import torch.distributed as dist

        reports = [None] * ctx.world_size
        dist.all_gather_object(reports, report, group=ctx.host_group)  # host group: no GPU sync
    changed = any(report[1] for report in reports)
    if changed:  # something wrote into a tensor the controller still holds as it sent it
        received.clear()
    if ctx.rank != 0:
        return None
    return {"samples": samples.detach().to("cpu", torch.float32), "log": captured.lines,
            "rank_logs": [report[0] for report in reports], "sent_tensors_changed": changed}
