"""Context Parallel for ComfyUI: hand each sampling run to the worker pool.

Controller side (the ComfyUI process): `apply_context_parallel` adds a keyed OUTER_SAMPLE
wrapper. When any sampler node runs, the wrapper does not load the model here; it sends the
pool one job (noise, latent, sigmas, conds, sampler, guider settings, seed, denoise mask,
feature settings) and returns the final latent. Weights travel once through shared memory
and stay cached in the workers under a fingerprint of the weights; LoRA and other weight
patches travel as ComfyUI patches (ComfyUI's own code applies them there). Large tensors of
the payload (the conds, a LoRA's patches) travel only when they changed since the last job
(`pool.sent_once`).
The worker side is `worker_jobs.py`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace

import torch

from ...attention import ContextParallelConfig
from ...pool.sent_once import TensorsSentOnce
from .comfy_pool import comfy_pool, pool_world
from .portable import (
    NotPortableError,
    check_model_options,
    check_object_patches,
    pickle_payload,
    portable_guider,
    portable_model_options,
    portable_object_patches,
    portable_sampler,
)

FEATURE = "context_parallel"
# The sampling state (the job may change it in place) always travels in the job's body.
INLINE_PARTS = ("noise", "latent_image", "sigmas", "denoise_mask")
WRAPPER_KEY = "para_attn_context_parallel_pool"

log = logging.getLogger("comfy_para_attn")
last_run_logs: list[list[str]] = []  # every rank's log lines of the last pool run (for tests and support)


@dataclass(frozen=True)
class ContextParallelSettings:
    gpus: int  # ranks; on a machine without CUDA these are CPU processes (gloo)
    ulysses: int
    ring: int
    cfg: int
    timeout_s: float = 300.0
    device: str = "cuda"
    attention_backend: str = "sdpa"  # local kernel inside the ring/ulysses paths (BACKEND_CHOICES)
    # auto layout with cfg parallel: the (ulysses, ring) it picks without, for a run that has no CFG
    without_cfg: tuple[int, int] | None = None

    @property
    def config(self) -> ContextParallelConfig:
        return ContextParallelConfig(ulysses=self.ulysses, ring=self.ring, cfg=self.cfg)

    def for_run(self, guider) -> "ContextParallelSettings":
        """These settings for a sampling run of `guider`: cfg parallel needs both CFG halves.
        A run without them (CFG 1, FLUX's usual; no negative prompt) runs on the sequence
        layout auto picks without cfg parallel, or, with a manual layout, is refused."""
        why_not = _why_no_cfg_halves(guider)
        if self.cfg == 1 or why_not is None:
            return self
        if self.without_cfg is None:
            raise ValueError(f"cfg_parallel {why_not}; turn cfg_parallel off on the Context Parallel node for this "
                             "sampler" + (" (or use a CFG above 1 with a negative prompt)."
                                          if type(guider).__name__ == "CFGGuider" else "."))
        ulysses, ring = self.without_cfg
        log.warning("Context Parallel: cfg_parallel is off for this run: it %s; auto layout without it: "
                    "ulysses %d x ring %d", why_not, ulysses, ring)
        return replace(self, ulysses=ulysses, ring=ring, cfg=1, without_cfg=None)


def _why_no_cfg_halves(guider) -> str | None:
    """Why a run of `guider` has no conditional and unconditional halves to split, or None."""
    cfg = getattr(guider, "cfg", None)
    if isinstance(cfg, (int, float)) and cfg != 1.0 and "negative" in guider.original_conds:
        return None
    if type(guider).__name__ != "CFGGuider":  # DualCFGGuider keeps its scales elsewhere (cfg1, cfg2)
        return (f"needs a guider that reports CFG > 1 with a negative prompt; this run's {type(guider).__name__} "
                f"reports CFG {cfg}")
    return "needs CFG > 1 with a negative prompt"


FROM_MODEL = "from model"  # the Attention Backend node's choice on the incoming model, else sdpa


def _backend_of(model_patcher, choice: str) -> str:
    from ...attention.local import BACKEND_CHOICES
    from .attention_backend import FEATURE as BACKEND_FEATURE

    if choice == FROM_MODEL:
        ours = model_patcher.model_options.get("transformer_options", {}).get("para_attn", {})
        return ours.get(BACKEND_FEATURE, "sdpa")
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"attention_backend must be one of {(FROM_MODEL, *BACKEND_CHOICES)}, got {choice!r}")
    return choice


def make_settings(model_patcher, gpus: int, ulysses: int, ring: int, cfg_parallel: bool, timeout_s: float,
                  auto: bool, attention_backend: str = FROM_MODEL) -> ContextParallelSettings:
    """Check a layout against this machine and the model; ValueError says what to set, in the
    node's own input names."""
    from .cp_refusals import refuse_unshardable
    from .patches import diffusion_model, model_family

    device, world = pool_world(gpus, "Context Parallel")
    if world > 1:  # one rank splits nothing: any model samples as it would without the node
        model_family(model_patcher)
        refuse_unshardable(model_patcher)
    dm = diffusion_model(model_patcher)
    heads = getattr(getattr(dm, "params", None), "num_heads", None) or getattr(dm, "num_heads", None)
    ranks = {"cuda": f"{world} GPUs", "cpu": f"{world} CPU ranks"}.get(device, "this process") + (
        " (gpus 0: all visible)" if gpus <= 0 and device != "local" else "")
    without_cfg = None
    if auto:
        config = ContextParallelConfig.auto(world, num_heads=heads, use_cfg=cfg_parallel)
        if config.cfg == 2:
            fallback = ContextParallelConfig.auto(world, num_heads=heads, use_cfg=False)
            without_cfg = (fallback.ulysses, fallback.ring)
        if world > 1:
            log.info("Context Parallel: auto layout for %s: ulysses %d x ring %d x cfg %d",
                     ranks, config.ulysses, config.ring, config.cfg)
        if cfg_parallel and config.cfg == 1 and world > 1:
            log.warning("Context Parallel: cfg_parallel is off for this run: it needs an even number of "
                        "GPUs, and there are %d", world)
    else:
        config = ContextParallelConfig(ulysses=ulysses, ring=ring, cfg=2 if cfg_parallel else 1)
        if world > 1:
            log.info("Context Parallel: layout for %s: ulysses %d x ring %d x cfg %d",
                     ranks, config.ulysses, config.ring, config.cfg)
    try:
        config.validate(world_size=world, num_heads=heads)
    except ValueError as exc:
        if config.world_size != world:
            raise ValueError(
                f"layout manual: ulysses_degree {config.ulysses} x ring_degree {config.ring}"
                f"{' x 2 (cfg_parallel)' if config.cfg == 2 else ''} = {config.world_size}, but there are "
                f"{ranks}. Make the product {world}, set gpus to {config.world_size}, or set layout to auto.") from None
        raise ValueError(f"{exc} (inputs ulysses_degree and ring_degree; layout auto picks a valid one)") from None
    return ContextParallelSettings(world, config.ulysses, config.ring, config.cfg, float(timeout_s), device,
                                   _backend_of(model_patcher, attention_backend), without_cfg)


def apply_context_parallel(model_patcher, settings: ContextParallelSettings):
    """A clone of `model_patcher` whose sampling runs in the worker pool; with one rank, the
    model as it is (a pool of one worker would only add the weights' transfer)."""
    import comfy.patcher_extension

    if settings.gpus == 1:
        log.info("Context Parallel: gpus 1: sampling stays in this process (no worker pool)")
        from .attention_backend import apply_attention_backend

        if settings.attention_backend != _backend_of(model_patcher, FROM_MODEL):
            return apply_attention_backend(model_patcher, settings.attention_backend)
        return model_patcher
    model = model_patcher.clone()
    to = model.model_options.setdefault("transformer_options", {})
    to["para_attn"] = {**to.get("para_attn", {}), FEATURE: settings}
    outer = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    model.remove_wrappers_with_key(outer, WRAPPER_KEY)
    model.add_wrapper_with_key(outer, WRAPPER_KEY, _outer_sample_wrapper)
    # Outermost: the run leaves this process before any other OUTER_SAMPLE wrapper (for
    # example First Block Cache's, which runs inside the workers instead).
    by_key = model.wrappers[outer]
    model.wrappers[outer] = {WRAPPER_KEY: by_key.pop(WRAPPER_KEY), **by_key}
    return model


# --- the model's weights: published once per fingerprint --------------------------------

def _base_weights(model_patcher) -> dict[str, torch.Tensor]:
    """The diffusion model's unpatched weights (ComfyUI may have merged a LoRA in place
    earlier in this process; the backup holds the originals)."""
    sd = model_patcher.model.diffusion_model.state_dict()
    prefix = "diffusion_model."
    for key, backup in getattr(model_patcher, "backup", {}).items():
        if key.startswith(prefix) and key[len(prefix):] in sd:
            sd[key[len(prefix):]] = backup.weight
    return sd


def _publish_model(model_patcher) -> tuple[str, object]:
    from .published import publish_weights

    return publish_weights(model_patcher.model.diffusion_model, lambda: _base_weights(model_patcher), "model")


# --- the OUTER_SAMPLE wrapper ---------------------------------------------------------------

_sent_once = TensorsSentOnce()  # the sampling job's large tensors the workers hold


def forgetting_sent_tensors():
    """Context manager: let go of the last prompt's tensors, no sampling job running or
    starting while its block makes the workers drop theirs; the next job sends its own again."""
    return _sent_once.forgetting()


# The payload's parts checked only if the payload does not pickle (then the first that
# cannot travel is named); the guider and the sampler are checked as they are made portable.
TRAVELLING_PARTS = {"model_config": "the model config", "patches": "the model's weight patches (LoRA)",
                    "weight_wrapper_patches": "the model's weight wrappers", "conds": "the conditioning",
                    "model_options": check_model_options, "object_patches": check_object_patches}


def _raw_mask(denoise_mask, latent_image):
    """The mask as the workers' `guider.sample` expects it, unprepared. Newer ComfyUI prepares
    it before OUTER_SAMPLE (one copy per latent channel); prepared again in the workers, a
    batch's masks came out as the first image's channels. One channel of it prepares back to
    the same mask; 0.3.x hands the mask over unprepared (another shape), kept as it is."""
    if denoise_mask.shape == latent_image.shape:
        return denoise_mask[:, :1]
    return denoise_mask


def _job_payload(guider, noise, latent_image, sampler, sigmas, denoise_mask, seed, settings):
    from .controlnets import has_controls, portable_controls
    from .parallel_vae import vae_recipe
    from .patches import model_family

    patcher = guider.model_patcher
    if patcher.hook_mode is not None and getattr(patcher, "hook_patches", None):
        raise NotPortableError("Context Parallel does not support hooks (CreateHook nodes) yet.")
    for name, conds in guider.original_conds.items():
        for cond in conds:
            if cond.get("hooks") is not None:
                raise NotPortableError("Context Parallel does not support conditioning hooks yet.")
    conds = guider.original_conds
    if has_controls(conds):
        if model_family(patcher) != "flux":
            raise NotPortableError(
                "ControlNet under Context Parallel works with FLUX models only (its residuals are added by "
                "token index); remove the ControlNet or the Context Parallel node.")
        conds = portable_controls(conds, vae_recipe)
    from .published import KEEP

    fingerprint, handle = _publish_model(patcher)
    guider_cls, guider_state = portable_guider(guider)
    return {
        "settings": settings,
        "fingerprint": fingerprint,
        "weights": handle,
        "keep_models": KEEP["model"],  # the workers keep as many models as /dev/shm does
        "model_config": patcher.model.model_config,
        "model_type": patcher.model.model_type,
        "patches": patcher.patches,
        "patches_uuid": patcher.patches_uuid,
        # ModelComputeDtype casts the weights at each call (force_cast_weights); trained adapters wrap them
        "force_cast_weights": getattr(patcher, "force_cast_weights", False),
        "weight_wrapper_patches": getattr(patcher, "weight_wrapper_patches", {}),
        "object_patches": portable_object_patches(patcher.object_patches),
        "model_options": portable_model_options(guider.model_options),
        "conds": conds,
        "guider": (guider_cls, guider_state),
        "sampler": portable_sampler(sampler),
        "noise": noise.cpu(),
        "latent_image": latent_image.cpu(),
        "sigmas": sigmas.cpu(),
        "denoise_mask": None if denoise_mask is None else _raw_mask(denoise_mask, latent_image).cpu(),
        "seed": seed,
        "x0_every_step": _previews_enabled(),
    }


def _previews_enabled() -> bool:
    """Whether ComfyUI draws latent previews (then the denoised latent travels every step;
    otherwise only the last one does, for SamplerCustomAdvanced's denoised output)."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return True
    return getattr(args, "preview_method", None) != LatentPreviewMethod.NoPreviews


def _make_room(pool, guider, noise, payload, settings) -> None:
    """Unload ComfyUI's own models (text encoders, VAE) from the pool's GPUs as far as rank 0
    needs: the weights unless the workers hold them, its share of the activations, and the
    ControlNets' and their hint VAEs' weights (counted even where the workers kept them)."""
    import comfy.sampler_helpers

    from .controlnets import controls_model_bytes
    from .memory import make_room_for_workers
    from .published import is_resident

    try:  # ComfyUI's own estimate for in-process sampling (both CFG halves in one batch)
        activations = comfy.sampler_helpers.estimate_memory(guider.model_patcher, noise.shape, guider.conds)[0]
    except Exception as exc:  # another ComfyUI version's signature: make room for the weights only
        log.debug("Context Parallel: no activation memory estimate (%s)", exc)
        activations = 0
    need = int(activations) // max(1, settings.ulysses * settings.ring) + controls_model_bytes(guider.original_conds)
    if not is_resident(pool, "model", payload["fingerprint"]):
        need += payload["weights"].nbytes
    make_room_for_workers(settings.gpus, need, "Context Parallel")


def _conds_run(guider) -> dict:
    """The guider's conds by name, less the negative where ComfyUI skips it: CFGGuider's own
    prediction at cfg 1, unless the model options turn that optimization off (DualCFGGuider,
    PerpNegGuider predict their own way and run theirs whatever `cfg` says)."""
    conds = dict(guider.original_conds)
    cfg_guider = next((c for c in type(guider).__mro__ if c.__name__ == "CFGGuider"), None)
    cfg = getattr(guider, "cfg", None)
    if (cfg_guider is not None and type(guider).predict_noise is cfg_guider.predict_noise
            and isinstance(cfg, (int, float)) and math.isclose(cfg, 1.0)
            and not guider.model_options.get("disable_cfg1_optimization", False)):
        conds.pop("negative", None)
    return conds


def _outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None,
                          disable_pbar=False, seed=None, latent_shapes=None, **kwargs):
    import comfy.model_management

    from ...pool import PoolInterrupted
    from ...pool.errors import WorkerFailure, with_hint
    from ...pool.protocol import Pickled
    from .cp_refusals import refuse_timestep_zero_references, refuse_token_patches, refuse_too_few_tokens

    if latent_shapes is not None and len(latent_shapes) > 1:  # newer ComfyUI: packed nested latents
        raise NotPortableError("Context Parallel does not support nested (packed) latents yet.")
    guider = executor.class_obj
    settings: ContextParallelSettings = guider.model_options["transformer_options"]["para_attn"][FEATURE].for_run(guider)
    if settings.ulysses * settings.ring > 1:
        conds_run = _conds_run(guider)
        refuse_too_few_tokens(guider.model_patcher, noise.shape, conds_run, settings.ulysses * settings.ring)
        refuse_timestep_zero_references(guider.model_patcher, conds_run)
        refuse_token_patches(guider.model_patcher)
    began = time.monotonic()
    payload = _job_payload(guider, noise, latent_image, sampler, sigmas, denoise_mask, seed, settings)
    pool = comfy_pool(settings.gpus, settings.device)
    total = max(1, len(sigmas) - 1)

    def on_progress(step, steps, extra):
        if callback is not None:  # on the device in-process sampling has them (TAESD previews run there)
            x0, x = (None if t is None else t.to(guider.model_patcher.load_device)
                     for t in (extra.get("x0"), extra.get("x")))
            callback(step, x0, x, steps)

    with _sent_once.job(pool.pids) as sent:  # what the workers hold follows this block's outcome
        pickled = Pickled(pickle_payload(payload, TRAVELLING_PARTS, pack=lambda p: sent.pack(p, inline=INLINE_PARTS)))
        prepared = time.monotonic()
        if settings.device == "cuda":
            _make_room(pool, guider, noise, payload, settings)
        room_made = time.monotonic()
        try:
            result = pool.run("comfy_para_attn.adapters.comfy.worker_jobs:sample", pickled,
                              timeout_s=settings.timeout_s, on_progress=on_progress,
                              should_interrupt=comfy.model_management.processing_interrupted)
        except PoolInterrupted:
            raise comfy.model_management.InterruptProcessingException()
        except WorkerFailure as exc:
            if exc.reason == "timeout":
                raise with_hint(exc, f"If one model call really takes longer (the first call compiles under Compile "
                                     f"Model; long videos), raise timeout_s on the Context Parallel node (now "
                                     f"{settings.timeout_s:g} s).") from exc
            if exc.reason == "out_of_memory":
                raise with_hint(exc, "To sample with less memory a GPU: lower the resolution or frame count, add FP8 "
                                     "Quantize, or use more GPUs.") from exc
            raise
        if result["sent_tensors_changed"]:
            sent.spoil()
    returned = time.monotonic()
    from .published import mark_resident

    mark_resident(pool, "model", payload["fingerprint"])
    for line in result["log"]:
        log.info("%s", line)
    last_run_logs[:] = result["rank_logs"]
    # Where a prompt's time outside the workers' sampling goes (their own line has the rest).
    log.info("Context Parallel: %d steps on %d %s rank(s) in %.2f s (job of %.1f MiB, %d tensor(s) the workers kept "
             "from the last prompt; job and pool ready in %.3f s, GPU room made in %.3f s, workers ran %.3f s)",
             total, settings.gpus, settings.device, time.monotonic() - began, len(pickled) / 2**20, sent.reused,
             prepared - began, room_made - prepared, returned - room_made)
    return result["samples"].to(noise.device)
