"""Chunk math of the mask-based methods (TALL masks / Consensus, EMR, MMER), shared by the merge methods in
``masks.py`` and the per-task mask builder ``pymerge.masks``.

Everything here is elementwise over the experts' task vectors ``tau[T, rows, n] = theta_t - theta_0`` (fp32),
given whole-model statistics computed beforehand (``GlobalTrim``), so any row chunking gives the same bits.

    trim_t      = tau_t * 1[|tau_t| >= h_t]             (tall_masks reference: global top-k%, ties kept)
    tau_MTL     = sum_t trim_t                          (task arithmetic, unscaled)
                | sum_t trim_t * 1[sgn trim_t = gamma]  (TIES dis-sum; gamma = sgn sum_t trim_t, 0 -> majority)
    TALL mask   m_t = |tau_t| > lambda_t * |tau_MTL - tau_t|
    EMR         gamma = +1 if sum_t tau_t > 0 else -1;  M_t = tau_t * gamma > 0;  tau_uni = gamma * max_t |M_t tau_t|
    MMER        tau_* = tau_uni (EMR's election);        m_t = |tau_t| > alpha * |tau_* - tau_t|
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..ops.consensus import stack_sum
from ..ops.select import Threshold, TopKSelector, magnitude_keys
from .base import Chunk, TensorJob

NO_TRIM = 100.0  # the reference's k = 100: "not applying mask"


def task_vectors(job: TensorJob, chunk: Chunk) -> torch.Tensor:
    """tau[T, rows, n] = theta_t - theta_0 for the experts of ``job`` (fp32, in input order)."""
    data, idx = chunk.data, job.expert_indices
    if not idx:
        return data[:0] - data[job.base_index]
    # a contiguous run of experts (the usual "base first") is a view: no gathered copy before the subtraction
    experts = data[idx[0]:idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else data[idx]
    return experts - data[job.base_index]


def keep_count(k: float, numel: int) -> int | None:
    """How many of the ``numel`` largest |tau| the tall_masks reference's ``topk_values_mask(K=k)`` keeps
    before ties: None for k = 100 (no trimming), else floor(numel * K) + 1 (capped at numel).

    The reference reads k >= 1 as a percentage (k / 100) and k < 1 as a fraction, computes
    ``kept = int(numel * K)`` and keeps ``|x| >= kthvalue(numel - kept)``, the (kept + 1)-th largest magnitude;
    all elements tied with it are kept too.
    """
    if k == NO_TRIM:
        return None
    frac = k / 100 if k >= 1 else k
    kept = int(numel * frac)
    return min(kept + 1, numel)


def check_k(k: float, where: str) -> None:
    if not 0 <= k <= 100:
        raise ConfigError(f"{where}: parameter 'k' is the percentage (k >= 1) or fraction (k < 1) of each task "
                          f"vector kept, between 0 and 100; got {k}")


@dataclass
class GlobalTrim:
    """Whole-model statistics of the tall_masks multi-task vector: per-task top-k thresholds over all tensors
    (passes "hi", "lo") and, for TIES, the majority sign that zero elected signs take (pass "sign")."""

    kinds: list[str]
    labels: list[str]  # task (expert) labels, in expert order
    selector: TopKSelector | None = None
    thresholds: list[Threshold] | None = None
    sign_total: int = 0  # sum over the model of sgn(sum_t trim_t): > 0 means "+1 is the majority"
    majority: float = 0.0
    done: set = field(default_factory=set)

    def trim(self, tau: torch.Tensor) -> torch.Tensor:
        """tau_t with |tau_t| below its model-wide threshold set to 0 (ties with the threshold kept)."""
        if self.thresholds is None:
            return tau
        keys = magnitude_keys(tau)
        out = tau.clone()
        for t, th in enumerate(self.thresholds):
            # key -1 (keep everything) also works as a ">=" bound: keys of |x| are >= 0
            out[t].masked_fill_(keys[t] < th.key, 0.0)
        return out


def pass_kinds(k: float, use_ties: bool) -> list[str]:
    """The whole-model passes a tall_masks multi-task vector needs: none for plain task arithmetic."""
    kinds = [] if k == NO_TRIM else ["hi", "lo"]
    return kinds + (["sign"] if use_ties else [])


def global_init(jobs: list[TensorJob], method: str) -> GlobalTrim:
    """State of the whole-model passes; every tensor must share the task list, ``k`` and ``use_ties``."""
    first = jobs[0]
    labels = [first.inputs[i] for i in first.expert_indices]
    for j in jobs:
        if [j.inputs[i] for i in j.expert_indices] != labels:
            raise ConfigError(f"{method}: every tensor must be merged from the same task models for the model-wide "
                              f"top-k; tensor '{j.name}' has {[j.inputs[i] for i in j.expert_indices]}, tensor "
                              f"'{first.name}' has {labels}")
        for key in ("k", "use_ties"):
            if j.params[key] != first.params[key]:
                raise ConfigError(f"{method}: parameter '{key}' must be the same for every tensor (it sets a "
                                  f"model-wide statistic); tensor '{j.name}' has {j.params[key]!r}, "
                                  f"tensor '{first.name}' has {first.params[key]!r}")
    k, use_ties = resolved_k(first.params), bool(first.params["use_ties"])
    state = GlobalTrim(pass_kinds(k, use_ties), labels)
    if "hi" in state.kinds:
        total = sum(j.numel for j in jobs)
        state.selector = TopKSelector([keep_count(k, total)] * len(labels), total, keep_all_ties=True)
    return state


def global_reduce(state: GlobalTrim, p: int, job: TensorJob, chunk: Chunk) -> None:
    tau = task_vectors(job, chunk)
    kind = state.kinds[p]
    if kind == "hi":
        state.selector.add_hi(magnitude_keys(tau).reshape(tau.shape[0], -1))
    elif kind == "lo":
        state.selector.add_lo(magnitude_keys(tau).reshape(tau.shape[0], -1))
    else:
        s = torch.sign(stack_sum(state.trim(tau)))
        state.sign_total += int((s > 0).sum()) - int((s < 0).sum())  # exact, whatever the model size


def global_end_pass(state: GlobalTrim, p: int) -> GlobalTrim:
    kind = state.kinds[p]
    if kind == "hi":
        state.selector.end_hi()
    elif kind == "lo":
        state.thresholds = state.selector.end_lo()
    else:
        state.majority = float((state.sign_total > 0) - (state.sign_total < 0))
    state.done.add(kind)
    return state


def resolved_k(params: dict) -> float:
    """``k`` as the reference uses it: given, else 100 (no trim) for task arithmetic and 20 for TIES."""
    k = params.get("k")
    if k is None:
        return 20.0 if params.get("use_ties") else NO_TRIM
    return float(k)


def multitask_vector(tau: torch.Tensor, trim: GlobalTrim | None, use_ties: bool) -> torch.Tensor:
    """tau_MTL of one chunk: the unscaled sum of the trimmed task vectors, or their TIES disjoint sum."""
    trimmed = trim.trim(tau) if trim is not None else tau
    if not use_ties:
        return stack_sum(trimmed)
    gamma = torch.sign(stack_sum(trimmed))
    gamma = torch.where(gamma == 0, torch.full_like(gamma, trim.majority if trim is not None else 0.0), gamma)
    # the reference keeps entries with the elected sign; where gamma is still 0 it keeps the negative ones
    agree = torch.where(gamma > 0, trimmed > 0, trimmed < 0)
    return stack_sum(torch.where(agree, trimmed, torch.zeros((), dtype=trimmed.dtype)))


def tall_masks(tau: torch.Tensor, shared: torch.Tensor, lambdas: list[float]) -> torch.Tensor:
    """m[T, ...] = |tau_t| > lambda_t * |shared - tau_t| (strict: a tie keeps the base)."""
    lam = torch.tensor(lambdas, dtype=torch.float32).reshape(-1, *([1] * (tau.dim() - 1)))
    bound = (shared.unsqueeze(0) - tau).abs_().mul_(lam)
    return tau.abs() > bound


def emr_unified(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau_uni, M[T, ...]): EMR's elected sign (+1 iff sum_t tau_t > 0, so 0 elects -1), the masks of the
    task vectors that agree with it, and the largest agreeing magnitude times the sign."""
    flag = torch.where(stack_sum(tau) > 0, 1.0, -1.0)
    signed = tau * flag  # |tau_t| where tau_t agrees with the elected sign, <= 0 elsewhere
    agree = signed > 0
    top = signed.clamp_min_(0).amax(dim=0)
    return top * flag, agree
