"""Context-parallel layout (`ContextParallelConfig`) and the process groups it needs.

Rank layout, outermost first: cfg x ring x ulysses. Ulysses is innermost so that its
all-to-alls (the heaviest traffic) stay between neighbouring ranks, which on one host are
usually the NVLink-closest GPUs.

    rank = cfg_index * (ring * ulysses) + ring_index * ulysses + ulysses_index
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer tuning knob from the environment; a value that is not one is logged and the
    default used (a typo must not stop the pack from loading)."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        logging.getLogger("comfy_para_attn.attention").warning(
            "%s=%r is not an integer >= %d; using %d", name, value, minimum, default)
        return default
    return number


@dataclass(frozen=True)
class ContextParallelConfig:
    """How the ranks of one model call are split: `ulysses * ring * cfg == world size`."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring * self.cfg

    @property
    def sequence_size(self) -> int:
        """Ranks that share one sequence (the ulysses x ring group)."""
        return self.ulysses * self.ring

    def validate(self, world_size: Optional[int] = None, num_heads: Optional[int] = None) -> None:
        """Raise ValueError saying what to change when this layout cannot run."""
        for name in ("ulysses", "ring", "cfg"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} degree must be a positive integer, got {value!r}.")
        if self.cfg > 2:
            raise ValueError(
                f"cfg degree {self.cfg} is not possible: classifier-free guidance has two halves "
                "(cond and uncond), so set cfg to 1 or 2."
            )
        if world_size is not None and self.world_size != world_size:
            raise ValueError(
                f"ulysses ({self.ulysses}) x ring ({self.ring}) x cfg ({self.cfg}) = {self.world_size} "
                f"does not match the {world_size} ranks/GPUs; choose degrees whose product is {world_size}."
            )
        if num_heads is not None and num_heads % self.ulysses != 0:
            divisors = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
            raise ValueError(
                f"ulysses degree {self.ulysses} does not divide the model's {num_heads} attention heads; "
                f"use a ulysses degree in {divisors} and put the remaining factor into ring."
            )

    @staticmethod
    def auto(world_size: int, num_heads: Optional[int] = None, use_cfg: bool = False) -> "ContextParallelConfig":
        """A good default layout: cfg parallel when guidance has two halves; a sequence
        group of 2 uses ring (at degree 2 ring moves as many bytes as Ulysses but overlaps
        them with attention: 80 vs 85 ms/step compiled, 107 vs 134 eager, FLUX on 2 H200s);
        larger groups take as much ulysses as the heads allow (its traffic per rank falls
        with the degree, ring's does not), ring for the rest."""
        cfg = 2 if use_cfg and world_size % 2 == 0 else 1
        remaining = world_size // cfg
        if remaining == 2:
            return ContextParallelConfig(ring=2, cfg=cfg)
        ulysses = remaining
        while ulysses > 1 and (remaining % ulysses or (num_heads is not None and num_heads % ulysses)):
            ulysses -= 1
        return ContextParallelConfig(ulysses=ulysses, ring=remaining // ulysses, cfg=cfg)


@dataclass(frozen=True)
class ParallelContext:
    """Process groups of one rank for a `ContextParallelConfig`.

    Groups are kept by name (str), which functional collectives accept and which
    `torch.compile` treats as a constant. `None` means the group has a single rank.
    """

    config: ContextParallelConfig
    rank: int
    ulysses_group: Optional[str]
    ring_group: Optional[str]
    sequence_group: Optional[str]
    cfg_group: Optional[str]
    world_group: Optional[str]

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.config.ulysses

    @property
    def ring_rank(self) -> int:
        return (self.rank // self.config.ulysses) % self.config.ring

    @property
    def sequence_rank(self) -> int:
        """Index of this rank's shard in the sequence (ring-major, ulysses-minor)."""
        return self.rank % self.config.sequence_size

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.config.sequence_size

    def all_reduce_sum(self, tensor):
        """Sum over every rank of the model call (sequence and cfg groups). Used by the
        First Block Cache so that all ranks take the same branch."""
        if self.world_group is None:
            return tensor
        from .collectives import all_reduce

        return all_reduce(tensor, "sum", self.world_group)

    def all_reduce_max(self, tensor):
        if self.world_group is None:
            return tensor
        from .collectives import all_reduce

        return all_reduce(tensor, "max", self.world_group)


def _group_ranks(config: ContextParallelConfig):
    """Yield (kind, ranks) for every group of the layout, in the same order on every rank."""
    u, r, c = config.ulysses, config.ring, config.cfg
    for ci in range(c):
        base = ci * r * u
        for ri in range(r):
            yield "ulysses", [base + ri * u + ui for ui in range(u)]
        for ui in range(u):
            yield "ring", [base + ri * u + ui for ri in range(r)]
        yield "sequence", list(range(base, base + r * u))
    for si in range(r * u):
        yield "cfg", [ci * r * u + si for ci in range(c)]


def keep_transfers_ahead_of_compute() -> None:
    """Turn off inductor's peak-memory reordering in this process (it is a context-parallel
    rank). The ring issues the next K/V transfer before the local block's attention so the two
    overlap; that reordering (on by default) can move the transfer, whose output is a new
    buffer, behind the attention kernel, and NCCL's stream then waits for the kernel: no
    overlap (it did so in `test_compiled_ring_issues_the_transfer_before_the_local_kernel`)."""
    import torch._inductor.config as inductor_config

    if getattr(inductor_config, "reorder_for_peak_memory", False):
        inductor_config.reorder_for_peak_memory = False


def build_parallel_context(
    config: ContextParallelConfig, *, num_heads: Optional[int] = None
) -> ParallelContext:
    """Create the process groups of `config` on the default group (all ranks must call this).

    The default process group must already be initialised with exactly
    `config.world_size` ranks.
    """
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    config.validate(world_size=world_size, num_heads=num_heads)
    names = {"ulysses": None, "ring": None, "sequence": None, "cfg": None}
    for kind, ranks in _group_ranks(config):
        # new_group must be called by every rank for every group, in the same order.
        group = dist.new_group(ranks) if len(ranks) > 1 else None
        if rank in ranks and group is not None:
            names[kind] = group.group_name
    if config.sequence_size > 1:
        keep_transfers_ahead_of_compute()
    world = dist.group.WORLD.group_name if world_size > 1 else None
    return ParallelContext(
        config=config,
        rank=rank,
        ulysses_group=names["ulysses"],
        ring_group=names["ring"],
        sequence_group=names["sequence"],
        cfg_group=names["cfg"],
        world_group=world,
    )
