"""NeuroMerging (Fang et al., EMNLP 2025): per-neuron split of the task vectors along / orthogonal to the base neuron.

    tau_t   = trim(theta_t - theta_0)       keep |tau_t| >= its k-th smallest, k = int(D * param_value_mask_rate)
                                            (D: the whole model with trim_scope: global, one tensor with tensor)
  2-D tensors, per row i (one neuron; w = theta_0[i, :]):
    alpha_t = <tau_t[i], w> / ||w||^2,      o_t = tau_t[i] - alpha_t w
    Par_i   = ties(alpha_1..T) * w          (parallel_mode: consistent)   or * w / ||w||   (reference)
    O = [o_1; ..; o_T] = U S V^T,  C = O V = U S,   rho = min(#{cumvar_j < cum_threshold} + 1, min(T, n))
    Orth_i  = sum_{j < rho} ties(C[:, j]) v_j
    theta   = theta_0 + lambda1 Par + lambda2 Orth
  1-D tensors ("point" weights):  theta = theta_0 + (lambda1 + lambda2)/2 * ties(tau)     (full mode)
                                  theta = theta_0 + lambda2 * ties(tau)                   (lite mode, Par = 0)

ties(x_1..T) is the reference's disjoint mean: elect sgn(sum_t x_t) (a zero sum takes the majority of the elected
signs over the batch: all rows of the tensor for alpha, all components of the row for C, all elements for point
weights), average the entries of the elected sign (nonzero count, at least 1).

Reference: ZzzitaoFang/NeuroMerging, ``model_merging_methods/merging_methods.py`` (``neuro_merging_double`` = full
mode, ``neuro_merging`` = lite) and ``NeuroMerging.py::neuro_kernel``; lambda1/lambda2 as ``inference_double.py``
(--lam1, lambda_code). The SVD of each row's T x n matrix is taken through its T x T Gram matrix in float64
(O(T^2 n) per row): with G = O O^T = U S^2 U^T, sum_j c_j v_j = O^T (sum_j c_j u_j / s_j).

Deliberate differences (docs/methods/research.md): tensors are classified by shape (2-D and above: neuronal; 1-D:
point) rather than by a name list; rows with ||w|| = 0 take alpha = 0 (the reference divides by zero);
components with s_j^2 <= 1e-14 * s_1^2 are numerically zero and dropped; ``parallel_mode: consistent`` fixes the
reference's unit quirk (its merged alpha is relative to w but multiplies w / ||w||), ``reference`` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..ops.consensus import stack_sum
from ..ops.select import TieCursor, TopKSelector, magnitude_keys
from ..ops.threads import threads_for
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge

EIG_FLOOR = 1e-14  # relative: eigenvalues of the Gram matrix below this are rounding noise

_PARAMS = (
    ParamSpec("param_value_mask_rate", float, default=0.8,
              doc="fraction of each task vector trimmed (smallest |tau|); 0.9-0.95 in the paper's LLM runs"),
    ParamSpec("lambda1", float, default=0.0, doc="scale of the parallel (along-the-neuron) part (--lam1)"),
    ParamSpec("lambda2", float, default=1.0, doc="scale of the orthogonal part (the paper's LLaMA-2 runs: 2.7-2.9)"),
    ParamSpec("cum_threshold", float, default=1.0, doc="cumulative energy of the orthogonal components kept"),
    ParamSpec("neuro_mode", str, default="full", doc="'full' (lambda1 and lambda2) or 'lite' (no parallel part)"),
    ParamSpec("parallel_mode", str, default="consistent",
              doc="'consistent' (merged alpha times w) or 'reference' (times w/||w||, the reference's quirk)"),
    ParamSpec("trim_scope", str, default="global", doc="'global' (whole model, the reference) or 'tensor'"),
)


def _trim_k(n: int, rate: float) -> int:
    """Keep-count for 'keep |x| >= k-th smallest' (ties kept), as the k-th largest of the selector."""
    k = int(n * rate)
    return n + 1 if k <= 0 else n - k + 1  # k = 0 keeps everything (the reference would fail)


def _setting(params: dict, where: str) -> tuple:
    rate, mode = float(params["param_value_mask_rate"]), str(params["neuro_mode"])
    unit, scope = str(params["parallel_mode"]), str(params["trim_scope"])
    if not 0 <= rate <= 1:
        raise ConfigError(f"{where}: param_value_mask_rate must be in [0, 1], got {rate}")
    if mode not in ("full", "lite"):
        raise ConfigError(f"{where}: neuro_mode must be 'full' or 'lite', got {mode!r}")
    if unit not in ("consistent", "reference"):
        raise ConfigError(f"{where}: parallel_mode must be 'consistent' or 'reference', got {unit!r}")
    if scope not in ("global", "tensor"):
        raise ConfigError(f"{where}: trim_scope must be 'global' or 'tensor', got {scope!r}")
    return rate, mode, unit, scope


def disjoint_mean(x: torch.Tensor, majority: torch.Tensor | float | None = None) -> torch.Tensor:
    """The reference's TIES kernel over dim 0 of ``x[T, ...]``: elected sign sgn(sum_t x_t); zero sums take
    ``majority`` (default: sgn of the sum of the elected signs over every other dim); mean of the entries with the
    elected sign (where the elected sign stays 0, the reference keeps the negative entries)."""
    sign = torch.sign(stack_sum(x))
    if majority is None:
        majority = torch.sign(sign.sum())
    sign = torch.where(sign == 0, majority, sign)
    keep = torch.where(sign > 0, x > 0, x < 0)
    picked = x * keep
    count = (picked != 0).sum(dim=0).to(x.dtype)
    return stack_sum(picked) / torch.clamp(count, min=1)


def _row_majority(c: torch.Tensor) -> torch.Tensor:
    """disjoint_mean over tasks for each row's components, ``c[rows, T, r]``, the majority taken per row."""
    sign = torch.sign(stack_sum(c.transpose(0, 1)))  # [rows, r]
    majority = torch.sign(sign.sum(dim=1, keepdim=True))
    sign = torch.where(sign == 0, majority, sign).unsqueeze(1)
    keep = torch.where(sign > 0, c > 0, c < 0)
    picked = (c * keep).transpose(0, 1)  # [T, rows, r]
    count = (picked != 0).sum(dim=0).to(c.dtype)
    return stack_sum(picked) / torch.clamp(count, min=1)


def orthogonal_merge(o: torch.Tensor, cum_threshold: float) -> torch.Tensor:
    """Orth rows of ``o[T, rows, n]`` (float64): sum_{j<rho} ties(C[:, j]) v_j with C = U S from each row's SVD."""
    t, rows, n = o.shape
    gram = torch.empty(rows, t, t, dtype=o.dtype)
    for a in range(t):
        for b in range(a, t):
            g = (o[a] * o[b]).sum(dim=-1)
            gram[:, a, b] = g
            gram[:, b, a] = g
    evals, u = torch.linalg.eigh(gram)  # ascending
    evals, u = evals.flip(-1).clamp(min=0), u.flip(-1)  # descending, like the SVD's S^2
    r = min(t, n)
    evals, u = evals[:, :r], u[:, :, :r]
    total = evals.sum(dim=1, keepdim=True)
    cum = torch.cumsum(evals, dim=1) / torch.where(total > 0, total, 1.0)
    rho = torch.clamp((cum < cum_threshold).sum(dim=1) + 1, max=r)  # [rows]
    used = torch.arange(r).unsqueeze(0) < rho.unsqueeze(1)
    alive = evals > EIG_FLOOR * evals[:, :1]
    s = evals.sqrt()
    coords = u * s.unsqueeze(1)  # C[row, t, j] = U[t, j] s_j
    coords = torch.where(alive.unsqueeze(1), coords, 0.0)
    cbar = _row_majority(coords)  # [rows, r]
    weight = torch.where(used & alive, cbar / torch.where(alive, s, 1.0), 0.0)  # c_j / s_j
    z = torch.einsum("rtj,rj->tr", u, weight)  # [T, rows]: Orth = sum_t z_t o_t
    return stack_sum(o * z.unsqueeze(-1))


class _NeuroMerge(TensorMerge):
    def __init__(self, method: "NeuroMethod", job: TensorJob):
        if job.base_index is None:
            raise ConfigError("neuromerging needs a base_model")
        self.job, self.experts = job, job.expert_indices
        p = job.params
        rate, self.mode, self.unit, scope = _setting(p, f"tensor '{job.name}'")
        self.lam1, self.lam2 = float(p["lambda1"]), float(p["lambda2"])
        self.cum = float(p["cum_threshold"])
        self.point = len(job.shape) < 2
        self.parallel = not self.point and self.mode == "full" and self.lam1 != 0
        self.selector = None
        if not self.experts:
            return
        if scope == "global":
            if not isinstance(job.global_state, dict):
                raise ConfigError(f"tensor '{job.name}': trim_scope: global needs the whole-model passes "
                                  "(set trim_scope once for the whole merge)")
            self.thresholds = [job.global_state[i] for i in self.experts]
            trim_passes = 0
        else:
            self.selector = TopKSelector([_trim_k(job.numel, rate)] * len(self.experts), job.numel,
                                         keep_all_ties=True)
            trim_passes = 2
        self.majority_pass = trim_passes if self.parallel else None
        self.reduce_passes = trim_passes + (1 if self.parallel else 0)
        self.sign_count = 0

    def _tau(self, chunk: Chunk) -> torch.Tensor:
        return chunk.data[self.experts] - chunk.data[self.job.base_index]

    def _trimmed(self, chunk: Chunk) -> torch.Tensor:
        tau = self._tau(chunk)
        keys = magnitude_keys(tau)
        cursor = TieCursor(1)  # keep-all-ties thresholds need no flat order
        for e in range(len(self.experts)):
            tau[e].mul_(cursor.mask(0, keys[e], self.thresholds[e]))
        return tau

    def reduce(self, p: int, chunk: Chunk) -> None:
        if p == self.majority_pass:
            alpha = self._split(chunk)[2]
            self.sign_count += int(torch.sign(stack_sum(alpha)).sum())
            return
        keys = magnitude_keys(self._tau(chunk)).reshape(len(self.experts), -1)
        (self.selector.add_hi if p == 0 else self.selector.add_lo)(keys)

    def end_pass(self, p: int) -> None:
        if p == 0 and self.selector is not None:
            self.selector.end_hi()
        elif p == 1 and self.selector is not None:
            self.thresholds = self.selector.end_lo()

    def _split(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(trimmed tau[T, rows, n], w[rows, n], alpha[T, rows], ||w||^2[rows]), all float64, for one chunk."""
        tau = self._trimmed(chunk).double()
        w = chunk.data[self.job.base_index].double()
        wn2 = (w * w).sum(dim=-1)
        dots = (tau * w).sum(dim=-1)
        alpha = torch.where(wn2 > 0, dots / torch.where(wn2 > 0, wn2, 1.0), 0.0)
        return tau, w, alpha, wn2

    def map(self, chunk: Chunk) -> torch.Tensor:
        base = chunk.data[self.job.base_index]
        if not self.experts:
            return base.clone()
        if self.point:
            merged = disjoint_mean(self._trimmed(chunk))
            scale = self.lam2 if self.mode == "lite" else (self.lam1 + self.lam2) / 2
            return base + scale * merged
        tau, w, alpha, wn2 = self._split(chunk)
        ortho = tau - alpha.unsqueeze(-1) * w
        out = w + self.lam2 * orthogonal_merge(ortho, self.cum)
        if self.parallel:
            majority = float(torch.sign(torch.tensor(float(self.sign_count))))
            abar = disjoint_mean(alpha, majority)
            if self.unit == "reference":
                abar = torch.where(wn2 > 0, abar / wn2.sqrt().clamp(min=1e-300), 0.0)
            out += self.lam1 * abar.unsqueeze(-1) * w
        return out.to(torch.float32)


@dataclass
class _GlobalTrim:
    selector: TopKSelector
    experts: list[int]
    base: int


@dataclass
class NeuroMethod(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _NeuroMerge(self, job)

    def global_passes(self, params: dict) -> int:
        return 2 if params.get("trim_scope", "global") == "global" else 0

    def global_init(self, jobs: list[TensorJob]) -> _GlobalTrim:
        first = jobs[0]
        rate = _setting(first.params, "neuromerging")[0]
        for j in jobs:
            if float(j.params["param_value_mask_rate"]) != rate or j.expert_indices != first.expert_indices:
                raise ConfigError(f"neuromerging with trim_scope: global needs one param_value_mask_rate and the same "
                                  f"models for every tensor; tensor '{j.name}' differs from '{first.name}'")
        total = sum(j.numel for j in jobs)
        experts = first.expert_indices
        return _GlobalTrim(TopKSelector([_trim_k(total, rate)] * len(experts), max(total, 1), keep_all_ties=True),
                           experts, first.base_index)

    def global_reduce(self, state: _GlobalTrim, p: int, job: TensorJob, chunk: Chunk) -> None:
        if not state.experts:
            return
        with threads_for(chunk.data.numel()):  # the executor's global passes pick no thread count
            keys = magnitude_keys(chunk.data[state.experts] - chunk.data[state.base]).reshape(len(state.experts), -1)
            (state.selector.add_hi if p == 0 else state.selector.add_lo)(keys)

    def global_end_pass(self, state: _GlobalTrim, p: int) -> dict | None:
        with threads_for(0):
            if p == 0:
                state.selector.end_hi()
                return None
            return dict(zip(state.experts, state.selector.end_lo()))


def methods() -> list[Method]:
    spec = MethodSpec(name="neuromerging", params=_PARAMS, needs_base=True, min_inputs=1,
                      reference="https://arxiv.org/abs/2503.05320 (ZzzitaoFang/NeuroMerging)",
                      doc=__doc__.split("\n\n")[0])
    # scratch: trimmed tau, float64 tau/w/orthogonal part (2x each) and the float64 output
    return [NeuroMethod(spec=spec, scratch_factor=8.0)]
