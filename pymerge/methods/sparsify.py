"""Task-vector sparsifiers as pass-aware objects (mergekit's ``magnitude``, ``magnitude_outliers``, ``random``,
``della_magprune``), one instance per output tensor covering all of its experts.

Semantics follow mergekit (mergekit/sparsify.py), with the deliberate differences documented in the README:
top-k keeps exactly k with ties broken by lowest flat index, and random masks come from Philox (ops/philox.py)
keyed by (seed, tensor, model, element) instead of torch.bernoulli.

Per expert with density d over n elements:
  magnitude           d >= 1: keep all (no rescale); else keep the top max(1, int(d*n)) |tau| (0 if d <= 0)
  magnitude_outliers  d >= 1: keep all; else drop the n_top = int(gamma*n) largest and the
                      n_bot = max(0, n - int(d*n) - n_top) smallest (ascending ranks [n_bot, n_bot + int(d*n)))
  random (DARE)       d >= 1: keep all; else keep iff u < d
  della_magprune      d >= 1: keep all; d <= 0: none; else p = (d - eps) + 2*eps * rank/(shape[1] - 1)
                      with rank the stable ascending rank of |tau| along dim 1 (a vector: one row); keep iff u < p
``rescale`` multiplies the kept values of a sparsified expert by ||tau||_1 / ||mask*tau||_1 (skipped when either
norm is below 1e-7), mergekit's L1 rescale since Feb 2025. The norms are fp64 row sums in eight interleaved lanes
(``lane_row_sums``, the order the native kernels reproduce), combined exactly across rows.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops.exact_sum import ExactSum, lane_row_sums
from ..ops.philox import keep_mask
from ..ops.select import TieCursor, TopKSelector, magnitude_keys

RESCALE_EPS = 1e-7  # mergekit's tolerance below which an L1 norm is treated as zero (no rescale)

KINDS = ("magnitude", "magnitude_outliers", "random", "della_magprune")


class Sparsifier:
    """Masks for every expert of one tensor, built over chunks.

    ``selection_passes`` reduce passes (radix histograms) come first, then, when ``rescale`` is on, one pass
    that accumulates the L1 norms before/after masking. ``mask(chunk_tau, flat_start)`` is valid afterwards
    and must be called on chunks in row order within a pass (``start_pass`` resets the tie cursor).
    """

    def __init__(self, kind: str, job, experts: list[int], rescale: bool):
        self.kind = kind
        self.job = job
        self.native = job.backend == "cpu"  # masks from the compiled Philox (bit-identical, faster)
        self.experts = experts
        n = job.numel
        self.n = n
        mp = [job.model_params[i] for i in experts]
        self.density = [float(p.get("density", 1.0)) for p in mp]
        for d, i in zip(self.density, experts):
            if d < 0:
                raise ConfigError(f"{job.name}: model '{job.inputs[i]}': density must be >= 0, got {d}")
        # experts whose tensor passes through untouched (density >= 1): mergekit returns them unscaled
        self.dense = [d >= 1 for d in self.density]
        self.selector: TopKSelector | None = None
        if kind == "magnitude":
            ks = [n if dense else (0 if d <= 0 or n == 0 else max(1, int(d * n)))
                  for d, dense in zip(self.density, self.dense)]
            self.selector = TopKSelector(ks, n)
            self._pairs = [(i, None) for i in range(len(experts))]
        elif kind == "magnitude_outliers":
            ks, src = [], []
            for e, (d, p) in enumerate(zip(self.density, mp)):
                ks += breadcrumb_ks(d, float(p.get("gamma", 0.01)), n)
                src += [e, e]
            self.selector = TopKSelector(ks, n, src=src)
            self._pairs = [(2 * e, 2 * e + 1) for e in range(len(experts))]
        elif kind == "della_magprune":
            self.rank_dim = job.shape[1] if len(job.shape) >= 2 else max(job.numel, 1)
            self.eps = [float(p.get("epsilon", 0.15)) for p in mp]
            for e, (d, eps) in enumerate(zip(self.density, self.eps)):
                if 0 < d < 1 and not (0 < d - eps and d + eps < 1):
                    raise ConfigError(
                        f"{job.name}: model '{job.inputs[experts[e]]}': della needs density ± epsilon inside (0, 1); "
                        f"got density {d}, epsilon {eps}")
        elif kind != "random":
            raise ValueError(f"unknown sparsifier {kind!r}")
        self.selection_passes = 2 if self.selector is not None else 0
        self.rescale = rescale and not all(self.dense)
        self.passes = self.selection_passes + (1 if self.rescale else 0)
        # per expert: (||tau||_1, ||mask * tau||_1), summed independently of the chunking
        self.l1 = [ExactSum(2) for _ in experts]
        self.scale = [1.0] * len(experts)
        self.thresholds = None
        self._cursor = TieCursor(len(self.selector.ks)) if self.selector else None
        self._last_mask = None  # ((row_start, shape), mask, tie counts after it)

    # --- reduce passes ---
    def start_pass(self) -> None:
        if self.selector is not None:
            self._cursor = TieCursor(len(self.selector.ks))

    def reduce(self, p: int, tau: torch.Tensor, chunk_row_start: int) -> None:
        """``tau``: [n_experts, rows, cols] fp32 task vectors of one chunk."""
        if p < self.selection_passes:
            keys = magnitude_keys(tau).reshape(tau.shape[0], -1)
            (self.selector.add_hi if p == 0 else self.selector.add_lo)(keys)
            return
        m = self.mask(tau, chunk_row_start)
        for e in range(len(self.experts)):
            if self.dense[e]:
                continue
            a = tau[e].abs()
            self.l1[e].add_rows(torch.stack([lane_row_sums(a), lane_row_sums(a * m[e])], dim=1))

    def end_pass(self, p: int) -> None:
        if p == 0 and self.selection_passes:
            self.selector.end_hi()
        elif p == 1 and self.selection_passes:
            self.thresholds = self.selector.end_lo()
        if p == self.passes - 1 and self.rescale:
            for e in range(len(self.experts)):
                b, a = self.l1[e].values()
                if not self.dense[e] and b >= RESCALE_EPS and a >= RESCALE_EPS:
                    self.scale[e] = b / a
        self.start_pass()

    # --- masks ---
    def mask(self, tau: torch.Tensor, row_start: int) -> torch.Tensor:
        """Boolean keep-mask [n_experts, rows, cols] for one chunk (chunks in row order within a pass).

        A chunk's mask is a function of its rows alone (the tie cursor replays the same counts every pass), so
        the last one is kept: a resident tensor's rescale pass and map pass then draw the masks once.
        """
        if self._last_mask is not None and self._last_mask[0] == (row_start, tuple(tau.shape)):
            m = self._last_mask[1]
            if self._cursor is not None:  # replay the tie counts this chunk would have consumed
                self._cursor.seen = list(self._last_mask[2])
            return m
        m = self._build_mask(tau, row_start)
        self._last_mask = ((row_start, tuple(tau.shape)), m, list(self._cursor.seen) if self._cursor else None)
        return m

    def _build_mask(self, tau: torch.Tensor, row_start: int) -> torch.Tensor:
        n_exp, rows, cols = tau.shape
        flat_start = row_start * cols
        out = torch.ones(tau.shape, dtype=torch.bool)
        if self.kind in ("magnitude", "magnitude_outliers"):
            keys = magnitude_keys(tau)
            for e, (outer, inner) in enumerate(self._pairs):
                if self.dense[e]:
                    continue
                m = self._cursor.mask(outer, keys[e], self.thresholds[outer])
                if inner is not None:
                    m &= ~self._cursor.mask(inner, keys[e], self.thresholds[inner])
                out[e] = m
        elif self.kind == "random":
            for e, i in enumerate(self.experts):
                if self.dense[e]:
                    continue
                out[e] = keep_mask(self.job.seed, self.job.model_ids[i], self.job.name, flat_start, rows * cols,
                                   self.density[e], native=self.native).reshape(rows, cols)
        else:  # della_magprune
            for e, i in enumerate(self.experts):
                if self.dense[e]:
                    continue
                if self.density[e] <= 0:
                    out[e] = False
                    continue
                prob = della_probabilities(tau[e], self.density[e], self.eps[e], self.rank_dim)
                out[e] = keep_mask(self.job.seed, self.job.model_ids[i], self.job.name, flat_start, rows * cols,
                                   prob, native=self.native).reshape(rows, cols)
        return out

    def apply(self, tau: torch.Tensor, row_start: int) -> torch.Tensor:
        """tau * mask * rescale for one chunk (in place on ``tau``)."""
        tau.mul_(self.mask(tau, row_start))
        for e, s in enumerate(self.scale):
            if s != 1.0:
                tau[e].mul_(s)
        return tau


def breadcrumb_ks(density: float, gamma: float, n: int) -> list[int]:
    """[k_outer, k_inner] of ``magnitude_outliers`` over n elements: keep the top k_outer |tau| except the top
    k_inner (drop the int(gamma*n) largest and the n - int(d*n) - int(gamma*n) smallest); all for d >= 1."""
    if density >= 1:
        return [n, 0]
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    k_outer = n - n_bot
    return [k_outer, max(0, k_outer - target)]


def della_probabilities(tau_rows: torch.Tensor, density: float, eps: float, rank_dim: int) -> torch.Tensor:
    """DELLA keep-probabilities of whole rows: fp32(d-eps) + fp32(2*eps) * rank/(rank_dim - 1).

    ``tau_rows`` is [rows, cols] with cols = rank_dim * rest: ranks run along the tensor's dim 1 (mergekit's
    ``argsort(dim=1)``; a vector is one row), batched over the other dims. rank is the stable ascending rank of
    |tau| (ties: lower index, lower rank); rank_dim == 1 gives ratio 0 (mergekit would divide 0 by 0).
    """
    rows, cols = tau_rows.shape
    view = magnitude_keys(tau_rows).reshape(rows, rank_dim, cols // max(rank_dim, 1))
    order = torch.sort(view, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    steps = torch.arange(rank_dim, dtype=order.dtype).reshape(1, rank_dim, 1).expand_as(order)
    ranks.scatter_(1, order, steps)
    ratio = ranks.to(torch.float32) / float(max(rank_dim - 1, 1))
    low = torch.tensor(density - eps, dtype=torch.float32)
    span = torch.tensor(2 * eps, dtype=torch.float32)
    return (low + span * ratio).reshape(rows, cols)
