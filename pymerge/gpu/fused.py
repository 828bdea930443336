"""Merges whose passes are the fused GPU kernels (kernels.py), on device chunks in the inputs' stored dtype.

The executor loads each chunk as one stack ``[n_inputs, rows, row_numel]`` in ``load_order`` (the experts,
then the base), so the experts are the contiguous view ``stack[:k]`` and no kernel needs a gather. Passes:
  ties                        hi histogram -> lo histogram -> map (tie cutoffs per chunk, in row order)
  dare_ties / dare_linear     [L1 rescale reduce] -> map
  della / della_linear        [L1 rescale reduce] -> map (per-row keep probabilities from ranks)
  task_arithmetic             map (keep everything)
The results equal the torch methods (pymerge/methods/task_arithmetic.py) bit for bit on the torch and native
backends: the L1 rescale sums are taken in the CPU backend's lane order (``kernels.l1_rows``), except with the
cuda set where Triton is not installed (torch sums on the device, in an order of their own).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BackendUnavailable
from ..methods import TensorJob
from ..ops.exact_sum import ExactSum
from ..ops.select import _walk_down, magnitude_keys
from ..methods.sparsify import RESCALE_EPS

BINS = 1 << 16
SUPPORTED = ("ties", "dare_ties", "dare_linear", "della", "della_linear", "task_arithmetic")


@dataclass
class DeviceChunk:
    """Rows [row_start, row_stop) of every input, stacked in load order, in the stored dtype, on the device."""

    row_start: int
    row_stop: int
    data: torch.Tensor  # [n_inputs, rows, row_numel]

    @property
    def flat_start(self) -> int:
        return self.row_start * self.data.shape[2]


def topk_count(density: float, n: int) -> int:
    """Elements the magnitude trim keeps (the Sparsifier's rule)."""
    if density >= 1:
        return n
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


class FusedMerge:
    """Common state: expert order, weights, tensor-level parameters; subclasses define the passes."""

    reduce_passes = 0
    scratch_per_element = 0.0  # device bytes per chunk element beyond the stack and the output (see plan.py)
    fixed_bytes = 0

    def __init__(self, job: TensorJob, kernels):
        self.job, self.kernels = job, kernels
        self.experts = job.expert_indices
        self.k = len(self.experts)
        self.load_order = [*self.experts, job.base_index]
        self.weights = [float(job.model_params[i]["weight"]) for i in self.experts]
        self.normalize = bool(job.params["normalize"])
        self.lam = float(job.params["lambda"])

    def split(self, chunk: DeviceChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """(base [n], experts [k, n]) flat views of a chunk."""
        data = chunk.data
        return data[self.k].reshape(-1), data[: self.k].reshape(self.k, -1)

    def reduce(self, p: int, chunk: DeviceChunk) -> None:  # pragma: no cover - merges without reduce passes
        raise NotImplementedError

    def end_pass(self, p: int) -> None:
        pass

    def map(self, chunk: DeviceChunk, out: torch.Tensor) -> None:
        raise NotImplementedError


class FusedTies(FusedMerge):
    """Per-tensor TIES: exact top-k by two histogram passes, then the fused map."""

    def __init__(self, job: TensorJob, kernels):
        super().__init__(job, kernels)
        n = job.numel
        self.ks = [topk_count(float(job.model_params[i]["density"]), n) for i in self.experts]
        self.todo = [j for j, k in enumerate(self.ks) if 0 < k < n]
        self.keys = [2**31 - 1 if k <= 0 else -1 for k in self.ks]
        self.budgets = [0] * self.k
        self.reduce_passes = 2 if self.todo else 0
        per_element, fixed = kernels.ties_scratch(self.k, n) if self.todo else (0.0, 0)
        self.scratch_per_element = per_element
        self.fixed_bytes = self.k * BINS * 8 + fixed if self.todo else 0
        self.hist = None
        self.hi: dict[int, tuple[int, int]] = {}

    def reduce(self, p: int, chunk: DeviceChunk) -> None:
        base, xs = self.split(chunk)
        if self.hist is None:
            self.hist = torch.zeros(self.k, BINS, dtype=torch.int64, device=xs.device)
        if p == 0:
            self.kernels.radix_hist_hi(xs, base, self.hist)
        else:
            bins = [self.hi[j][0] if j in self.hi else 0 for j in range(self.k)]
            self.kernels.radix_hist_lo(xs, bins, base, self.hist)

    def end_pass(self, p: int) -> None:
        hist = self.hist.to("cpu", copy=True)  # a copy even on a CPU device: the buffer is zeroed next
        self.hist.zero_()
        if p == 0:
            self.hi = {j: _walk_down(hist[j], self.ks[j]) for j in self.todo}
            return
        for j in self.todo:
            need = self.ks[j] - self.hi[j][1]
            lo, above_lo = _walk_down(hist[j], need)
            ties = need - above_lo
            self.keys[j] = (self.hi[j][0] << 16) | lo
            self.budgets[j] = -1 if ties == int(hist[j, lo]) else ties  # -1: every tie kept, no scan
        self.hist = None

    def map(self, chunk: DeviceChunk, out: torch.Tensor) -> None:
        base, xs = self.split(chunk)
        cutoffs, self.budgets = self.kernels.tie_cutoffs(base, xs, self.keys, self.budgets)
        self.kernels.ties_map(base, xs, self.weights, self.keys, cutoffs, self.lam, self.normalize, True,
                              out.reshape(-1))


class FusedRandom(FusedMerge):
    """DARE / DELLA (Philox keep masks) and plain task arithmetic, with the optional L1 rescale pass."""

    def __init__(self, job: TensorJob, kernels, kind: str | None, consensus: str | None):
        super().__init__(job, kernels)
        self.kind, self.consensus = kind, consensus
        mp = [job.model_params[i] for i in self.experts]
        self.density = [float(p.get("density", 1.0)) for p in mp] if kind else [1.0] * self.k
        self.dense = [d >= 1 for d in self.density]
        self.eps = [float(p.get("epsilon", 0.15)) for p in mp]
        self.rank_dim = job.shape[1] if len(job.shape) >= 2 else max(job.numel, 1)
        self.ids = [job.model_ids[i] for i in self.experts]
        rescale = bool(job.params.get("rescale", False)) and kind is not None
        self.reduce_passes = 1 if rescale and not all(self.dense) else 0
        self.l1 = [ExactSum(2) for _ in self.experts]
        self.scales = [1.0] * self.k
        self.scratch_per_element = 24.0 + (48.0 + 4.0 * self.k if kind == "della" else 0.0)

    def _probs(self, base: torch.Tensor, xs: torch.Tensor, rows: int) -> list:
        """Per expert: its keep probability (float), or a per-element fp32 tensor (DELLA)."""
        out = []
        for j in range(self.k):
            d = self.density[j]
            if self.dense[j]:
                out.append(1.0)
            elif self.kind == "random" or d <= 0:
                out.append(max(d, 0.0))
            else:
                tau = (xs[j].float() - base.float()).reshape(rows, -1)
                out.append(della_probabilities(tau, d, self.eps[j], self.rank_dim).reshape(-1))
        return out

    def reduce(self, p: int, chunk: DeviceChunk) -> None:
        base, xs = self.split(chunk)
        rows = chunk.data.shape[1]
        probs = self._probs(base, xs, rows)
        for j in range(self.k):
            if self.dense[j]:
                continue
            sums = self.kernels.l1_rows(base.reshape(rows, -1), xs[j].reshape(rows, -1), seed=self.job.seed,
                                        model=self.ids[j], tensor_name=self.job.name, start=chunk.flat_start,
                                        prob=probs[j])
            self.l1[j].add_rows(sums.cpu())

    def end_pass(self, p: int) -> None:
        for j in range(self.k):
            b, a = self.l1[j].values()
            if not self.dense[j] and b >= RESCALE_EPS and a >= RESCALE_EPS:
                self.scales[j] = b / a

    def map(self, chunk: DeviceChunk, out: torch.Tensor) -> None:
        base, xs = self.split(chunk)
        self.kernels.dare_map(base, xs, self.weights, seed=self.job.seed, model_ids=self.ids,
                              tensor_name=self.job.name, probs=self._probs(base, xs, chunk.data.shape[1]),
                              scales=self.scales, start=chunk.flat_start, consensus=self.consensus,
                              normalize=self.normalize, lambda_=self.lam, out=out.reshape(-1))


def della_probabilities(tau_rows: torch.Tensor, density: float, eps: float, rank_dim: int) -> torch.Tensor:
    """DELLA keep probabilities of whole rows on tau_rows' device: fp32(d - eps) + fp32(2 eps) * rank/(rank_dim-1),
    rank = stable ascending rank of |tau| along dim 1 (pymerge.methods.sparsify.della_probabilities, device-aware)."""
    rows, cols = tau_rows.shape
    dev = tau_rows.device
    view = magnitude_keys(tau_rows).reshape(rows, rank_dim, cols // max(rank_dim, 1))
    order = torch.sort(view, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    steps = torch.arange(rank_dim, dtype=order.dtype, device=dev).reshape(1, rank_dim, 1).expand_as(order)
    ranks.scatter_(1, order, steps)
    ratio = ranks.to(torch.float32) / float(max(rank_dim - 1, 1))
    low = torch.tensor(density - eps, dtype=torch.float32, device=dev)
    span = torch.tensor(2 * eps, dtype=torch.float32, device=dev)
    return (low + span * ratio).reshape(rows, cols)


def fused_merge(method: str, job: TensorJob, kernels) -> FusedMerge:
    """The fused GPU merge of ``method`` for one tensor; BackendUnavailable naming what is not supported."""
    p = job.params
    if job.base_index is None:
        raise BackendUnavailable(f"{method}: the GPU engine needs a base model")
    if not job.expert_indices:
        raise BackendUnavailable(f"{method}: tensor '{job.name}' has no expert besides the base")
    consensus = p.get("consensus_method", "sum")
    if method == "ties":
        if p.get("trim_scope", "tensor") != "tensor" or p.get("rescale") or consensus != "sum":
            raise BackendUnavailable("ties on the GPU engine supports trim_scope: tensor, rescale: false and "
                                     "consensus_method: sum; use --device cpu for the other settings")
        return FusedTies(job, kernels)
    if method in ("dare_ties", "dare_linear", "della", "della_linear", "task_arithmetic"):
        kind = {"dare": "random", "della": "della", "task": None}[method.split("_")[0]]
        ties_like = method in ("dare_ties", "della")
        return FusedRandom(job, kernels, kind, consensus if ties_like else None)
    raise BackendUnavailable(f"merge method '{method}' has no GPU implementation yet (GPU engine supports "
                             f"{', '.join(SUPPORTED)}); use --device cpu")
