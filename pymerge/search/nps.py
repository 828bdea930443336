"""NPS (Neural Parameter Search): re-weight magnitude bins of each task vector, keep the top fraction by the
re-weighted magnitude, and search the bin weights (and per-task lambdas) with an evolution strategy.

Per task t, over the whole flattened model (methods.md F1; the paper's code was not available, so this
follows the paper and the choices below are ours, documented in docs/search.md):
  bins       M rank intervals of |tau_t| (global quantiles at m/M), bin 0 the smallest magnitudes;
  candidate  weights w[t, m] (start 1) -> score_e = |tau_t[e]| * w[t, bin(e)];
             keep mask m_t = the top round(keep * D) scores (exactly k, ties by lowest index);
  pruned     tau'_t = m_t * tau_t (times w[t, bin] too when ``rescale_bins``);
  merge      theta = theta_0 + sum_t lambda_t tau'_t  (divided by sum_t lambda_t when ``normalize``),
             lambda_t searched too when ``search_lambdas`` (start ``init_lambda``).
All weights equal is plain magnitude pruning, so the starting point is TA of magnitude-pruned task vectors.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import ConfigError
from .coefficients import coefficient_search
from .result import SearchResult
from .session import Evaluate, Session
from .task_vectors import TaskVectors, flat_quantile, topk_keep


def magnitude_bins(tau: torch.Tensor, bins: int) -> torch.Tensor:
    """bin id (int64, 0 = smallest |tau|) of every element of each row: M rank intervals of |tau| per row."""
    a = tau.abs()
    d = a.shape[1]
    edges = torch.cat([flat_quantile(a, min(d - 1, (m * d) // bins)) for m in range(1, bins)], dim=1) \
        if bins > 1 else a[:, :0]
    ids = torch.zeros_like(a, dtype=torch.int64)
    for m in range(bins - 1):  # element in bin m+1 and above when |tau| >= the m-th edge
        ids += (a >= edges[:, m:m + 1]).to(torch.int64)
    return ids


def nps(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], evaluate: Evaluate, *,
        keep: float = 0.2, bins: int = 4, search_lambdas: bool = True, init_lambda: float = 1.0,
        normalize: bool = False, rescale_bins: bool = False, weight_bounds: tuple[float, float] = (0.0, 2.0),
        lambda_bounds: tuple[float, float] = (0.0, 3.0), budget: int = 100, popsize: int | None = None,
        sigma: float = 0.1, seed: int = 0, optimizer: str = "auto", exclude: Sequence[str] = (),
        resume: SearchResult | None = None) -> SearchResult:
    """Maximise ``evaluate`` over NPS candidates (module docstring); returns the best with its state dict.

    Search vector: T*bins bin weights in ``weight_bounds`` (start 1), then T lambdas in ``lambda_bounds``
    when ``search_lambdas``. ``budget``, ``popsize``, ``sigma``, ``seed``, ``optimizer``, ``exclude`` and
    ``resume`` as in ``lambda_search``.
    """
    if not 0 < keep <= 1:
        raise ConfigError(f"nps: keep (kept fraction of each task vector) must be in (0, 1], got {keep}")
    if not 1 <= bins <= 256:
        raise ConfigError(f"nps: bins must be in [1, 256], got {bins}")
    tv = TaskVectors(base, experts, exclude)
    t, d = tv.count, tv.numel
    bin_ids = magnitude_bins(tv.tau, bins)
    mags = tv.tau.abs()
    k = max(1, round(keep * d))
    n_w = t * bins

    def split(x):
        w = torch.tensor(x[:n_w], dtype=torch.float32, device=tv.device).reshape(t, bins)
        lam = list(x[n_w:]) if search_lambdas else [init_lambda] * t
        return w, lam

    def decode(x):
        w, lam = split(x)
        return {"bin_weights": [[float(v) for v in row] for row in w.cpu()], "lambdas": [float(v) for v in lam]}

    def delta(x):
        w, lam = split(x)
        out = torch.zeros(d, dtype=torch.float32, device=tv.device)
        for i in range(t):
            wi = w[i][bin_ids[i]]
            mask = topk_keep(mags[i] * wi, k)
            pruned = tv.tau[i] * mask
            if rescale_bins:
                pruned = pruned * wi
            out.add_(pruned, alpha=float(lam[i]))
        if normalize:
            total = float(sum(lam))
            if total == 0:
                return torch.zeros_like(out)
            out /= total
        return out

    x0 = [1.0] * n_w + ([float(init_lambda)] * t if search_lambdas else [])
    lower = [weight_bounds[0]] * n_w + ([lambda_bounds[0]] * t if search_lambdas else [])
    upper = [weight_bounds[1]] * n_w + ([lambda_bounds[1]] * t if search_lambdas else [])
    session = Session("nps", evaluate, optimizer, resume)
    return coefficient_search(session, x0=x0, lower=lower, upper=upper, budget=budget, popsize=popsize,
                              sigma=sigma, seed=seed, optimizer=optimizer, decode=decode, delta=delta,
                              state_dict=tv.state_dict, elements=tv.tau.numel())
