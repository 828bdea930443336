"""Per-task coefficient search (PCB-ES / TPA-ES, per-task lambda for task arithmetic and TIES)."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .coefficients import coefficient_search
from .contributions import contributions, weighted_sum
from .result import SearchResult
from .session import Evaluate, Session
from .task_vectors import TaskVectors


def lambda_search(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                  evaluate: Evaluate, *, method: str = "pcb", budget: int = 100,
                  bounds: tuple[float, float] = (0.0, 3.0), init: float | Sequence[float] | None = None,
                  density: float = 0.2, ratio: float = 0.1, popsize: int | None = None, sigma: float = 0.1,
                  seed: int = 0, optimizer: str = "auto", exclude: Sequence[str] = (),
                  resume: SearchResult | None = None) -> SearchResult:
    """Maximise ``evaluate(base + sum_t lambda_t k_t)`` over per-task coefficients lambda in ``bounds``.

    ``k_t`` are ``method``'s per-task contributions (pymerge/search/contributions.py), computed once:
    ``task_arithmetic`` (tau_t), ``ties`` (trim to ``density`` per tensor, elect, disjoint mean) or ``pcb``
    (PCB-Merging keeping the top ``ratio`` of balanced scores, whole model; lambda inside the weighted mean as in
    PCB-ES). ``init`` (default: 1/T for task_arithmetic, i.e. plain averaging; 1 otherwise, i.e. plain TIES / PCB)
    is evaluated first; then ``optimizer`` ('auto', 'builtin', 'cma', 'nevergrad') spends the rest of ``budget``
    evaluations in generations of ``popsize`` with initial step ``sigma`` x the bounds' width. State dicts
    handed to ``evaluate`` have the base's keys, dtypes and device; tensors matching an ``exclude`` regex and
    non-float tensors are the base's. Deterministic for a seed (with the builtin or cma optimiser).
    """
    tv = TaskVectors(base, experts, exclude)
    t = tv.count
    k = contributions(tv, method, density=density, ratio=ratio)
    if init is None:
        init = 1.0 / t if method == "task_arithmetic" else 1.0
    x0 = [float(init)] * t if isinstance(init, (int, float)) else [float(v) for v in init]
    session = Session("lambda_search", evaluate, optimizer, resume)
    result = coefficient_search(
        session, x0=x0, lower=[bounds[0]] * t, upper=[bounds[1]] * t, budget=budget, popsize=popsize,
        sigma=sigma, seed=seed, optimizer=optimizer, decode=lambda x: {"method": method, "lambdas": list(x)},
        delta=lambda x: weighted_sum(k, x), state_dict=tv.state_dict, elements=tv.tau.numel())
    return result
