"""Every rank batches ComfyUI's cond/uncond calls alike: the memory estimate that decides it is
agreed across the ranks (runs inside each pool worker; installed by context_parallel.py)."""
from __future__ import annotations

import torch

from ...attention import ParallelContext


class AgreedMemoryEstimate:
    """Object patch for `BaseModel.memory_required`. While ComfyUI batches conds
    (`calc_cond_batch`) it takes cond and uncond together only if the estimate fits this
    GPU's free memory, which differs between GPUs; every rank must batch alike (the
    collectives need the same shapes), so there the ranks agree: 0 (fits on all) or inf.
    A rank holds 1/sequence_size of the tokens and, with cfg parallel, half of the batch when
    the call has one chunk per cfg rank (what `CfgSplitWrapper` splits), so its share of
    ComfyUI's whole-call estimate is what must fit. The agreement (a collective
    and a host sync) is made once per input shape and job (free memory changes between
    prompts: other models, the VAE, FP8 on or off); ComfyUI asks on every step. Everywhere
    else (the load decision before sampling, which each rank may take on its own) it answers
    ComfyUI's real estimate: inf there would unload the model and load it in low-VRAM mode."""

    def __init__(self, estimate, cp: ParallelContext):
        self.estimate = estimate
        self.cp = cp
        self.agreed = {}  # (input shape, need) -> answer, for this job only
        self.batching = False  # set by `AgreeWhileBatching` around calc_cond_batch
        self.chunk_batch = 1  # the latent's batch: a batched call holds input_shape[0] / this chunks

    def __deepcopy__(self, memo):
        return self

    def __call__(self, input_shape, cond_shapes={}):
        need = self.estimate(input_shape, cond_shapes=cond_shapes)
        if not self.batching:
            return need
        key = (tuple(input_shape), need)
        if key not in self.agreed:
            self.agreed[key] = self._agree(need, input_shape[0])
        return self.agreed[key]

    def _agree(self, need, batch: int) -> float:
        import comfy.model_management

        device = comfy.model_management.get_torch_device()
        chunks = batch // max(1, self.chunk_batch)
        split = self.cp.config.cfg > 1 and chunks == self.cp.config.cfg  # as CfgSplitWrapper decides
        share = need / (self.cp.config.sequence_size * (self.cp.config.cfg if split else 1))
        fits = share * 1.5 < comfy.model_management.get_free_memory(device)
        flag = torch.tensor([0.0 if fits else 1.0], device=device)
        misfits = self.cp.all_reduce_sum(flag)
        return 0.0 if float(misfits.item()) == 0.0 else float("inf")


class AgreeWhileBatching:
    """CALC_COND_BATCH wrapper: the memory estimate is agreed across ranks only in there."""

    def __init__(self, estimate: AgreedMemoryEstimate):
        self.estimate = estimate

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, model, conds, x_in, *args, **kwargs):
        self.estimate.batching = True
        self.estimate.chunk_batch = x_in.shape[0]
        try:
            return executor(model, conds, x_in, *args, **kwargs)
        finally:
            self.estimate.batching = False
