"""First Block Cache: the model-agnostic state machine.

One `FirstBlockCache` object lives for one sampling run. An adapter (ComfyUI or diffusers)
calls it twice per model call:

1. after the first transformer block, `begin_call(part, step, first_residual, ...)`
   with the first block's residual of the image stream (`out - in`); it returns True when
   the rest of the network may be skipped (a *hit*);
2. on a hit, the adapter takes `tail(part)` (the residual from the first block's output to
   the last block's output, stored at the last computed step) and adds it to the first
   block's output; on a miss it runs the rest and calls `end_call(part, tail)`.

The decision compares `mean|r_t - r_prev| / mean|r_prev|` with the threshold, where `r_prev`
is the first-block residual of the last *computed* step for that part. It is made once per
step (`step` is the sigma or timestep of the call): when a step is split into several model
calls (cond and uncond in separate batches), the first call decides and the others follow,
each with its own buffers (`part` keys them). A part that has no valid buffers computes. A
part seen twice at one step starts a new step: the sampler evaluated the model twice at that
sigma (Heun's correction call, then the next step's first call), and each evaluation decides
(and counts towards `max_consecutive_hits`) on its own.

Under context parallelism pass `reduce_sum` (sum over the ranks of the call): the numerator,
denominator and a veto flag are summed before the comparison, so every rank takes the same
branch even when their local diffs fall on opposite sides of the threshold. The reduction runs
on every deciding call, hit-capable or not, so no rank can skip a collective that another
rank enters.

This module imports torch only; nothing here knows about ComfyUI or torch.distributed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

import torch

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FirstBlockCacheSettings:
    """The user's settings: small and picklable (workers re-apply features from it)."""

    residual_diff_threshold: float = 0.12
    start_percent: float = 0.0
    end_percent: float = 1.0
    max_consecutive_hits: int = -1  # -1 unlimited, 0 never reuse

    def __post_init__(self):
        if self.residual_diff_threshold < 0:
            raise ValueError(f"residual_diff_threshold must be >= 0, got {self.residual_diff_threshold}")
        if not 0.0 <= self.start_percent <= 1.0 or not 0.0 <= self.end_percent <= 1.0:
            raise ValueError(f"start_percent and end_percent must lie in [0, 1], got "
                             f"{self.start_percent} and {self.end_percent}")
        if self.start_percent > self.end_percent:
            raise ValueError(f"start_percent ({self.start_percent}) is after end_percent ({self.end_percent}): no step "
                             "could be cached; lower start_percent or raise end_percent")
        if self.max_consecutive_hits < -1:
            raise ValueError(f"max_consecutive_hits must be -1 (unlimited) or >= 0, got {self.max_consecutive_hits}")

    @property
    def enabled(self) -> bool:
        """False when the settings can never reuse a step (threshold 0 or no hits allowed)."""
        return self.residual_diff_threshold > 0 and self.max_consecutive_hits != 0


class _Part:
    """Buffers of one part of a step (one cond/uncond batch layout)."""

    __slots__ = ("signature", "prev_residual", "tail")

    def __init__(self, signature):
        self.signature = signature
        self.prev_residual: Optional[torch.Tensor] = None  # first-block residual, last computed step
        self.tail: Any = None  # residual from first block output to last block output


def relative_diff_sums(current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """`[sum|current - previous|, sum|previous|]` in fp32 (sums, not means: they add up
    across ranks; the element count cancels in the ratio)."""
    num = (current - previous).abs().sum(dtype=torch.float32)
    den = previous.abs().sum(dtype=torch.float32)
    return torch.stack((num, den))


class FirstBlockCache:
    """State of the First Block Cache for one sampling run."""

    def __init__(self, threshold: float, max_consecutive_hits: int = -1):
        self.threshold = float(threshold)
        self.max_consecutive_hits = int(max_consecutive_hits)
        self.calls = 0  # model calls seen in this run
        self.hits = 0  # model calls that reused the tail
        self.last_diff: Optional[float] = None  # relative diff of the last decision (None: not compared)
        self.history: list[bool] = []  # hit or not, per model call of this run
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every buffer and the step history (counters stay for the run's log line)."""
        self._parts: dict[Hashable, _Part] = {}
        self._step: Optional[float] = None
        self._step_hit: Optional[bool] = None  # decision of the current step, None: undecided
        self._step_parts: set = set()  # parts seen in the current step
        self._consecutive = 0

    def free(self) -> None:
        """Drop all tensors (end of a sampling run): no memory held between prompts."""
        self.reset()

    @property
    def buffers(self) -> int:
        return sum((p.prev_residual is not None) + (p.tail is not None) for p in self._parts.values())

    # -- per call --------------------------------------------------------------------------
    def _start_step(self, step: Optional[float], part: Hashable) -> None:
        if (step is None or step == self._step) and part not in self._step_parts:
            self._step_parts.add(part)
            return
        if step is not None and self._step is not None and step > self._step:
            self.reset()  # sigma rose: a new schedule started without a new run
        self._step = step if step is not None else self._step
        self._step_hit = None
        self._step_parts = {part}

    def _part(self, part: Hashable, residual: torch.Tensor) -> _Part:
        signature = (tuple(residual.shape), residual.dtype, residual.device)
        buf = self._parts.get(part)
        if buf is None or buf.signature != signature:
            buf = self._parts[part] = _Part(signature)
        return buf

    def _decide(self, buf: _Part, residual: torch.Tensor, allowed: bool,
                reduce_sum: Optional[ReduceSum]) -> bool:
        capped = 0 <= self.max_consecutive_hits <= self._consecutive
        can_hit = allowed and not capped and buf.prev_residual is not None and buf.tail is not None
        if reduce_sum is None and not can_hit:
            self.last_diff = None
            return False
        if can_hit:
            sums = relative_diff_sums(residual, buf.prev_residual)
        else:
            sums = torch.zeros(2, dtype=torch.float32, device=residual.device)
        veto = torch.tensor([0.0 if can_hit else 1.0], dtype=torch.float32, device=residual.device)
        values = torch.cat((sums, veto))
        if reduce_sum is not None:
            values = reduce_sum(values)
        num, den, vetoes = values.tolist()
        if vetoes > 0 or den <= 0:
            self.last_diff = None
            return False
        self.last_diff = num / den
        return self.last_diff < self.threshold

    def begin_call(self, part: Hashable, step: Optional[float], first_residual: torch.Tensor, *,
                   allowed: bool = True, reduce_sum: Optional[ReduceSum] = None) -> bool:
        """Record one model call after its first block; return True to reuse the tail.

        part: key of this call's batch layout (e.g. `(cond_or_uncond, uuids)`).
        step: sigma/timestep of the call; a new value starts a new step, a rising one resets.
        allowed: False outside the caching window (start/end of the schedule).
        reduce_sum: sums a tensor over the ranks of this call (context parallelism).
        """
        self._start_step(step, part)
        self.calls += 1
        buf = self._part(part, first_residual)
        if self._step_hit is None:  # first call of this step decides for all its parts
            self._step_hit = self._decide(buf, first_residual, allowed, reduce_sum)
            self._consecutive = self._consecutive + 1 if self._step_hit else 0
        hit = self._step_hit and buf.tail is not None
        self.history.append(hit)
        if hit:
            self.hits += 1
        else:
            buf.prev_residual = first_residual.detach()
            buf.tail = None  # replaced by end_call once the rest has run
        return hit

    def skip_call(self) -> None:
        """Count a model call that was not considered for reuse (cache disabled)."""
        self.calls += 1
        self.history.append(False)

    def tail(self, part: Hashable) -> Any:
        """The stored tail residual of `part` (valid after `begin_call` returned True)."""
        return self._parts[part].tail

    def end_call(self, part: Hashable, tail: Any) -> None:
        """Store the tail residual of a computed call."""
        buf = self._parts.get(part)
        if buf is not None:
            buf.tail = tail

    def summary(self) -> str:
        return f"reused {self.hits} of {self.calls} model calls (threshold {self.threshold:g})"
