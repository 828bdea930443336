"""Per-task contributions k_t such that a merge with per-task coefficients is ``base + sum_t lambda_t k_t``.

Computed once from the resident task vectors, so every candidate of a lambda search costs one weighted sum:
  task_arithmetic  k_t = tau_t
  ties             k_t = tau^_t m_t / max(sum_s m_s, 1): per-tensor top-``density`` trim (exactly k, ties by
                   lowest index), sum-sign election on the unit-weight trimmed vectors, disjoint mean
                   (mergekit's ``ties`` with weight 1 at lambda_t = 1: checked against ``pymerge.ops.ties``)
  pcb              k_t = scale_t tauc_t / max(sum_s scale_s, 1e-12): PCB-Merging over the whole flattened
                   model as ``pcb_ES.py`` (methods.md B6), so lambda_t sits inside the weighted mean as in
                   TPA-ES.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..ops.consensus import sign_consensus
from .task_vectors import TaskVectors, flat_quantile, topk_keep


def task_arithmetic(tv: TaskVectors) -> torch.Tensor:
    return tv.tau


def ties(tv: TaskVectors, density: float) -> torch.Tensor:
    if not 0 < density <= 1:
        raise ConfigError(f"lambda_search: ties density must be in (0, 1], got {density}")
    trimmed = torch.zeros_like(tv.tau)
    for _, a, b in tv.tensor_slices():
        n = b - a
        k = n if density >= 1 else int(density * n)  # mergekit: k = int(density * numel)
        for t in range(tv.count):
            seg = tv.tau[t, a:b]
            trimmed[t, a:b] = seg * topk_keep(seg, k)
    agree = sign_consensus(trimmed, "sum")
    kept = trimmed * agree
    count = agree.sum(0).clamp_(min=1).to(kept.dtype)
    return kept / count


def _minmax(x: torch.Tensor) -> torch.Tensor:
    """Row-wise (x - min) / (max - min); a constant row maps to 0 (the reference would give NaN)."""
    lo = x.amin(dim=1, keepdim=True)
    span = x.amax(dim=1, keepdim=True) - lo
    return (x - lo) / torch.where(span > 0, span, torch.ones_like(span))


def pcb(tv: TaskVectors, ratio: float, clip: float = 0.01) -> torch.Tensor:
    """PCB (vision pcb_ES.py variant): clip |tau| at the [clip, 1-clip] quantiles, intra = exp(T Norm(a)^2),
    inter = sum_j tanh(s_t s_j) with s = sgn(tau) Norm(a), scale = Norm(clamp(intra*inter, q(1-ratio), max))."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"lambda_search: pcb ratio (kept fraction) must be in (0, 1], got {ratio}")
    tau = tv.tau
    n, d = tau.shape
    a = tau.abs()
    lo_i, hi_i = int(d * clip), int(d * (1 - clip) - 1)
    a = torch.clamp(a, flat_quantile(a, lo_i), flat_quantile(a, max(hi_i, lo_i)))
    sign = torch.sign(tau)
    clipped = sign * a
    norm = _minmax(a)
    s = sign * norm
    intra = torch.exp(n * norm * norm)
    inter = torch.zeros_like(tau)
    for t in range(n):
        for j in range(n):  # in order: the same sums on every device
            inter[t] += torch.tanh(s[t] * s[j])
    beta = intra * inter
    q = flat_quantile(beta, min(int(d * (1 - ratio)), d - 1))
    scale = _minmax(torch.maximum(beta, q))
    total = scale.sum(0).clamp_(min=1e-12)
    return scale * clipped / total


def contributions(tv: TaskVectors, method: str, *, density: float, ratio: float) -> torch.Tensor:
    if method == "task_arithmetic":
        return task_arithmetic(tv)
    if method == "ties":
        return ties(tv, density)
    if method == "pcb":
        return pcb(tv, ratio)
    raise ConfigError(f"lambda_search: method must be 'task_arithmetic', 'ties' or 'pcb', got {method!r}")


def weighted_sum(k: torch.Tensor, lambdas) -> torch.Tensor:
    """sum_t lambda_t k_t, accumulated in task order."""
    out = torch.zeros_like(k[0])
    for t, lam in enumerate(lambdas):
        if lam != 0 and math.isfinite(lam):
            out.add_(k[t], alpha=float(lam))
    return out
