"""The loop shared by the coefficient searches (per-task lambda, NPS): evaluate the starting point, then ask
the optimiser for whole generations and score every candidate until the budget is spent."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..errors import ConfigError
from ..ops.threads import threads_for
from .optimizers import check_bounds, make_optimizer
from .result import SearchResult
from .session import Session

Decode = Callable[[list[float]], dict[str, Any]]  # x -> named parameters (for the history)
Delta = Callable[[list[float]], torch.Tensor]  # x -> flat merged task vector


def default_popsize(dim: int) -> int:
    """4 + floor(3 ln n), CMA-ES's default population size."""
    import math

    return 4 + int(3 * math.log(max(dim, 1)))


def coefficient_search(session: Session, *, x0: Sequence[float], lower: Sequence[float],
                       upper: Sequence[float], budget: int, popsize: int | None, sigma: float, seed: int,
                       optimizer: str, decode: Decode, delta: Delta,
                       state_dict: Callable[[torch.Tensor], dict], elements: int) -> SearchResult:
    """Maximise evaluate(state_dict(delta(x))) over x in [lower, upper] from x0 within ``budget`` evaluations.

    ``elements``: size of the resident task vectors; below ops.threads' limit everything runs on one thread."""
    what = session.method
    check_bounds(x0, lower, upper, what)
    if budget < 1:
        raise ConfigError(f"{what}: budget must be >= 1 evaluation, got {budget}")
    if not 0 < sigma <= 1:
        raise ConfigError(f"{what}: sigma (a fraction of each bound's width) must be in (0, 1], got {sigma}")
    popsize = popsize or default_popsize(len(x0))
    if popsize < 1:
        raise ConfigError(f"{what}: popsize must be >= 1, got {popsize}")

    def build_for(x):
        return lambda: state_dict(delta(x))

    x0 = [float(v) for v in x0]
    with threads_for(elements):  # a small model (and its evaluator) runs faster on one thread
        start = session.score(0, 0, x0, decode(x0), build_for(x0))
        opt = make_optimizer(optimizer, x0, lower, upper, sigma=sigma, popsize=popsize, budget=budget, seed=seed,
                             start_score=start)
        session.optimizer = opt.name
        for gen in range(1, (budget - 1) // popsize + 1):
            xs = opt.ask()
            scores = [session.score(gen, i, x, decode(x), build_for(x)) for i, x in enumerate(xs)]
            opt.tell(xs, scores)
        return session.result()
