"""Generalized task arithmetic on the native CPU kernels: the same bytes as task_arithmetic.py, read once per
pass from the memory maps in their stored dtype (no fp32 copies).

Covered (everything else runs on the torch merge, or is an error when the cpu backend was asked for by name):
  task_arithmetic   no trim, no election                     -> one ties_map pass with consensus off
  ties              per-tensor magnitude trim, weighted-sum election, rescale off
                    -> a sampled hi histogram and one bracket pass (exact thresholds; native_cpu.MagnitudeTopK),
                       then one fused ties_map pass
  breadcrumbs(_ties) the same with two thresholds per expert (keep the top k_outer minus the top k_inner),
                    both selections sharing the expert's hi histogram; rescale off, election by sum
The thresholds and tie counts equal the torch ``TopKSelector``'s; ties at a threshold are kept by lowest flat
index through ``native_cpu.TieScan`` (``tie_cutoffs`` from the block the bracket pass located the last kept tie
in), carried from chunk to chunk in row order, so any chunking gives the same bits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .base import Chunk, TensorJob
from .native_dispatch import NativeTaskVectorMerge, native_dtypes_unsupported
from .sparsify import breadcrumb_ks

if TYPE_CHECKING:  # pragma: no cover
    from .task_arithmetic import GeneralizedTaskArithmetic

def native_gta_unsupported(method: "GeneralizedTaskArithmetic", job: TensorJob) -> str | None:
    """Why the native CPU kernels cannot merge ``job`` with ``method`` (None when they can)."""
    p = job.params
    name = method.spec.name
    if name not in ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"):
        return f"merge method '{name}' has no native CPU kernel yet"
    if name == "ties" and p.get("trim_scope", "tensor") != "tensor":
        return "ties with trim_scope: global has no native CPU kernel yet"
    if name != "task_arithmetic":
        if p.get("rescale"):
            return f"{name} with rescale: true has no native CPU kernel yet"
        if p.get("consensus_method", "sum") != "sum":
            return f"{name} with consensus_method: count has no native CPU kernel yet"
    if job.base_index is None or not job.expert_indices:
        return "the native kernels need a base model and at least one other model"
    return native_dtypes_unsupported(job)


class NativeGTAMerge(NativeTaskVectorMerge):
    """task_arithmetic / ties of one tensor on the native CPU kernels (module docstring)."""

    def __init__(self, method: "GeneralizedTaskArithmetic", job: TensorJob):
        super().__init__(job)
        self.consensus = method.consensus
        n = job.numel
        ks, src = [], []
        self.band = method.sparsifier == "magnitude_outliers"  # breadcrumbs: selections (outer, inner) per expert
        for e, i in enumerate(self.experts):
            mp = job.model_params[i]
            d = float(mp.get("density", 1.0))
            if d < 0:
                raise ConfigError(f"{job.name}: model '{job.inputs[i]}': density must be >= 0, got {d}")
            if self.band:
                ks += breadcrumb_ks(d, float(mp.get("gamma", 0.01)), n)
                src += [e, e]
            else:
                ks.append(self.nc.topk_count(d, n) if method.sparsifier == "magnitude" else n)
                src.append(e)
        self.select = self.nc.MagnitudeTopK(ks, n, src)
        self.reduce_passes = self.select.passes
        # The selection passes read the base and every expert they select for, and count the Inf/NaN task-vector
        # keys (a NaN base makes every key NaN); when that is every expert, the separate scan is not needed.
        self.finds_nonfinite = self.reduce_passes > 0 and len(self.select.hi_experts) == len(self.experts)
        self.thresholds = self.select.result if not self.reduce_passes else None
        self.ties = None  # native_cpu.TieScan, made by the first map chunk

    def reduce(self, p: int, chunk: Chunk) -> None:
        base, experts = self._inputs(chunk)
        self.select.add(p, base, experts)

    def end_pass(self, p: int) -> None:
        self.select.end(p)
        if p == 2 and self.select.nonfinite and self.nonfinite_found is not None:
            self.nonfinite_found()
        if p == self.reduce_passes - 1:
            self.thresholds = self.select.result

    def map(self, chunk: Chunk) -> torch.Tensor:
        base, experts = self._inputs(chunk)
        keys = [th.key for th in self.thresholds]
        if self.ties is None:  # the first chunk of the map pass
            self.ties = self.select.tie_scan()
        cutoffs = self.ties.cutoffs(base, [experts[e] for e in self.select.src], chunk.flat_start)
        kw = dict(lambda_=self.lam, normalize=self.normalize, consensus=self.consensus, out_dtype=self.job.out_dtype)
        if self.band:
            return self.nc.ties_map(base, experts, self.weights, keys[0::2], cutoffs[0::2], inner_keys=keys[1::2],
                                    inner_cutoffs=cutoffs[1::2], **kw)
        return self.nc.ties_map(base, experts, self.weights, keys, cutoffs, **kw)
