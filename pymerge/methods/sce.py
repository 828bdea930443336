"""SCE (Select, Calculate, Erase; FuseChat, Wan et al. 2024), mergekit's ``sce``.

    select:    with select_topk < 1, keep in every tau_t the top int(select_topk * #nonzero(var)) elements of
               var_d = population variance over t of tau_t[d] (exactly k, ties to the lowest flat index)
    calculate: c_t = mean(tau^_t ** 2) over the tensor, c <- c / sum(c)  (uniform if |sum(c)| < 1e-6)
    erase:     e_t = sgn(tau^_t) == gamma, gamma from the (unweighted) sum election
    merge:     theta = theta_0 + sum_t c_t e_t tau^_t / max(sum_t c_t e_t, 1e-6)
Passes: [var histogram hi, var histogram lo] when selecting, then one pass for the energies, then map.
"""

from __future__ import annotations

import torch

from ..ops.consensus import sign_consensus, stack_sum
from ..ops.exact_sum import ExactSum, row_sums
from ..ops.select import TieCursor, TopKSelector, magnitude_keys
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


def variance(tau: torch.Tensor) -> torch.Tensor:
    """Population variance over the experts (dim 0), in a fixed order so chunking cannot change it."""
    n = tau.shape[0]
    mean = stack_sum(tau) / n
    return stack_sum((tau - mean) ** 2) / n


class _SCEMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        self.job = job
        self.experts = job.expert_indices
        self.topk = float(job.params["select_topk"])
        self.select = 0 < self.topk < 1
        self.drop_all = self.topk <= 0
        # k is known only after the first pass counted the nonzero variances; 1 is a placeholder that keeps the
        # histogram pass running (k = 0 would skip it)
        self.selector = TopKSelector([1], job.numel) if self.select else None
        self.nonzero = 0
        self.reduce_passes = ((2 if self.select else 0) + 1) if self.experts else 0
        self.energy = ExactSum(len(self.experts))  # sum of tau^2 per expert
        self.cursor = TieCursor(1)

    def _tau(self, chunk: Chunk) -> torch.Tensor:
        return chunk.data[self.experts] - chunk.data[self.job.base_index]

    def _selected(self, tau: torch.Tensor) -> torch.Tensor:
        if self.drop_all:
            return torch.zeros_like(tau)
        if not self.select:
            return tau
        keys = magnitude_keys(variance(tau))
        return tau * self.cursor.mask(0, keys, self.threshold)

    def reduce(self, p: int, chunk: Chunk) -> None:
        tau = self._tau(chunk)
        if self.select and p < 2:
            keys = magnitude_keys(variance(tau)).reshape(1, -1)
            if p == 0:
                self.nonzero += int((keys != 0).sum())
                self.selector.add_hi(keys)
            else:
                self.selector.add_lo(keys)
            return
        sel = self._selected(tau)
        sq = sel.double() ** 2
        self.energy.add_rows(torch.stack([row_sums(sq[e]) for e in range(len(self.experts))], dim=1))

    def end_pass(self, p: int) -> None:
        if self.select and p == 0:
            self.selector.ks = [int(self.nonzero * self.topk)]
            self.selector.end_hi()
        elif self.select and p == 1:
            (self.threshold,) = self.selector.end_lo()
        else:
            c = torch.tensor(self.energy.values(), dtype=torch.float64) / max(self.job.numel, 1)
            total = float(c.sum())
            n = len(self.experts)
            self.c = (torch.full((n,), 1.0 / n, dtype=torch.float64) if abs(total) < 1e-6 else c / total)
            self.c = self.c.to(torch.float32).reshape(-1, 1, 1)
        self.cursor = TieCursor(1)

    def map(self, chunk: Chunk) -> torch.Tensor:
        if not self.experts:
            return chunk.data[self.job.base_index].clone()  # only the base: mergekit returns it
        tau = self._selected(self._tau(chunk))
        erase = sign_consensus(tau, "sum")
        w = self.c * erase
        merged = stack_sum(tau * w) / stack_sum(w).clamp(min=1e-6)
        return chunk.data[self.job.base_index] + merged


class SCE(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _SCEMerge(job)


def sce_method() -> Method:
    spec = MethodSpec(name="sce",
                      params=(ParamSpec("select_topk", float, default=1.0, doc="fraction of high-variance elements kept"),
                              ParamSpec("int8_mask", bool, default=False, doc="accepted for compatibility")),
                      needs_base=True, min_inputs=1, reference="https://arxiv.org/abs/2408.07990")
    return SCE(spec=spec, scratch_factor=3.0)
