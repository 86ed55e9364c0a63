"""What a job function receives: `fn(ctx: WorkerContext, payload) -> result`.

Job modules may import this for type hints; it imports torch only when a collective runs.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

from . import protocol
from .errors import JobInterrupted, JobRefused, breaks_cuda


def breaks_the_device(error: BaseException) -> bool:
    """A CUDA error other than out of memory (an illegal address, a device-side assert) leaves
    the process's CUDA context unusable: no agreed stop can keep such a worker."""
    return breaks_cuda((cls.__name__ for cls in type(error).__mro__), str(error))


class InterruptFlag:
    """The job id the controller asked to stop; set by the worker's reader thread."""

    def __init__(self):
        self.job_id: int | None = None


class WorkerContext:
    """Per-job view of one worker.

    `rank`, `world_size` and `device` (a torch.device; each worker sees one GPU, so CUDA
    ranks use cuda:0) describe the process. `cache` is a dict that lives as long as the
    worker, shared by all jobs: keep loaded models there. `job` and `job_id` name the call.
    """

    def __init__(
        self,
        *,
        rank: int,
        world_size: int,
        device,
        cache: dict,
        job: str,
        job_id: int,
        post: Callable[[Any], None],
        interrupt_flag: InterruptFlag,
        cpu_group=None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.cache = cache
        self.job = job
        self.job_id = job_id
        self._post = post
        self._interrupt_flag = interrupt_flag
        self._cpu_group = cpu_group  # host-side collectives (gloo) when the main group is NCCL

    @contextlib.contextmanager
    def host_threads(self):
        """Run the block with this rank's share of the host's cores as torch's intra-op
        threads (or the user's OMP_NUM_THREADS), then go back to the worker's setting: CUDA
        ranks sample with one host thread (see launch.worker_env), while blending VAE tiles
        on the host is real CPU work."""
        import torch

        from ..attention.config import env_int
        from .launch import HOST_THREADS_ENV

        before = torch.get_num_threads()
        torch.set_num_threads(env_int(HOST_THREADS_ENV, before, minimum=1))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def report_progress(self, step: int, total: int, **extra) -> None:
        """Tell the controller that `step` of `total` is done; also resets its hang timer.

        Non-blocking (a sender thread writes the pipe). Only rank 0's reports travel, so
        every rank may call this unconditionally.
        """
        if self.rank == 0:
            self._post(protocol.Progress(self.job_id, int(step), int(total), dict(extra)))

    def heartbeat(self) -> None:
        """Reset the controller's hang timer without a step (call it in long loads)."""
        if self.rank == 0:
            self._post(protocol.Heartbeat(self.job_id))

    @property
    def host_group(self):
        """The group for host-side (CPU tensor) collectives: a gloo group of all ranks, or None
        for the default group (world size 1, or a gloo pool)."""
        return self._cpu_group

    @property
    def interrupt_requested(self) -> bool:
        """Whether THIS rank has seen an interrupt. Local and unagreed: do not branch on
        it around collectives; use `check_interrupt()` for that."""
        return self._interrupt_flag.job_id == self.job_id

    def check_interrupt(self, failed: BaseException | None = None) -> None:
        """Collective: all ranks agree whether any of them saw an interrupt, and if so all
        raise `JobInterrupted` here, at the same step. Every rank must call it at the same
        points (for example once per sampling step). It is always a collective, also when no
        rank saw an interrupt: jobs use it as a barrier (Parallel VAE Decode sums the ranks'
        images only after it). `failed`: this rank's exception from the local work since the
        last check; if any rank passes one, every rank raises `JobRefused` here instead (the
        rank that failed with its own exception as the cause) and the pool survives. A CUDA
        error other than out of memory is raised as it is: it ends the pool."""
        if failed is not None and breaks_the_device(failed):
            raise failed  # not agreed: the pool (and this CUDA context) must go
        requested = 1 if self.interrupt_requested else 0
        failures = 0 if failed is None else 1
        if self.world_size > 1:
            import torch
            import torch.distributed as dist

            # On the host group the flags never touch the GPU: no device sync per step.
            device = "cpu" if self._cpu_group is not None else self.device
            flags = torch.tensor([requested, failures], dtype=torch.int32, device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._cpu_group)
            requested, failures = (int(v) for v in flags.tolist())
        if failures:
            raise JobRefused(f"job {self.job} (id {self.job_id}) stopped on every rank: "
                             + ("this rank failed" if failed is not None else "another rank failed"), failed)
        if requested:
            raise JobInterrupted(f"job {self.job} (id {self.job_id}) interrupted on request")

    def run_agreed(self, step: Callable[[], Any]) -> Any:
        """Run `step()` on every rank, then agree (one host collective, also an interrupt
        check) whether it raised anywhere; if so every rank raises `JobRefused` and the
        controller fails the job with `PoolJobError`, keeping the pool. `step` must be local
        work: a collective inside it could be left half-done by a rank that failed before it.
        Returns what `step` returned."""
        try:
            result, failed = step(), None
        except Exception as exc:  # KeyboardInterrupt / SystemExit still end the worker's job as before
            result, failed = None, exc
        try:
            self.check_interrupt(failed=failed)
        finally:
            del failed  # its traceback holds the step's frames (a model, activations) in a cycle
        return result


def group_check(ctx: WorkerContext, payload) -> bool:
    """A job the controller runs after every rank failed a job outside an agreed step: it
    completes, and returns True, only if the ranks are in step. On a GPU it first waits for the
    device (a collective kernel of the failed job still waiting for its peer never finishes, so
    the check times out); then one all-reduce on every process group this worker has used: the
    default group, each Context Parallel layout's groups (cached by the sampling jobs, in the
    same order on every rank) and the host group. A collective left half-done on any of them
    pairs with the check's and leaves some rank waiting."""
    import torch
    import torch.distributed as dist

    from ..attention.collectives import process_group

    if ctx.world_size == 1:
        return True
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    groups = [None]
    for value in list(ctx.cache.values()):  # ParallelContext: groups kept by name
        for field in ("ulysses_group", "ring_group", "sequence_group", "cfg_group"):
            name = getattr(value, field, None)
            if isinstance(name, str) and process_group(name) not in groups:
                groups.append(process_group(name))
    if ctx.host_group is not None:
        groups.append(ctx.host_group)
    in_step = True
    for group in groups:
        on_device = dist.get_backend(group) == "nccl"
        value = torch.ones(1, device=ctx.device if on_device else "cpu")
        dist.all_reduce(value, group=group)
        in_step = in_step and int(value.item()) == dist.get_world_size(group)  # .item() waits for it
    return in_step
