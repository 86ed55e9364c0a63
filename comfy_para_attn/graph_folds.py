"""The pre-grad graph pass Compile Model hands inductor: every fold of a computation into
one of our kernels (`quant.cat_fold`, `quant.norm_fold`: an fp8 layer's input into its
quantization; `rope_fold`: the q/k RMSNorm and rotary embedding)."""
from __future__ import annotations

import collections

from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from comfy_para_attn.kernels import fp8_rowwise, qk_norm_rope

from . import rope_fold
from .quant import cat_fold, norm_fold

FOLDS = {"cat": cat_fold.fold_cats, "layer norm": norm_fold.fold_norms, "rope": rope_fold.fold_rotations,
         "rope pairs": rope_fold.pair_rotations}  # in this order: the pairs are of the rope fold's calls


class GraphFolds(CustomGraphPass):
    """Inductor `pre_grad_custom_pass`; `counts` has the rewrites per fold, `folded` their sum.
    Its uuid hashes the folds' source and the rope switch, so inductor's caches key on what the
    pass does."""

    def __init__(self):
        self.counts = collections.Counter()

    @property
    def folded(self) -> int:
        return sum(self.counts.values())

    def __call__(self, graph) -> None:
        for name, fold in FOLDS.items():
            self.counts[name] += fold(graph)

    def uuid(self):
        # The rope switches are read when the pass runs: a graph cached with the other setting must not be reused.
        files = (__file__, cat_fold.__file__, norm_fold.__file__, rope_fold.__file__, fp8_rowwise.__file__,
                 qk_norm_rope.__file__)  # the folds, and the checks that decide where they apply
        return get_hash_for_files(files), rope_fold.enabled(), rope_fold.pairs_enabled(), rope_fold.seq_major_enabled()


__all__ = ["GraphFolds"]
