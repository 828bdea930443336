"""Derivative-free maximisers for the coefficient searches, all with one ask/tell interface.

  builtin    a (1+lambda) evolution strategy with the 1/5th success rule: Gaussian offspring around the best
             point so far, clipped to the bounds; the step size grows when more than a fifth of a generation
             beats the parent and shrinks otherwise. Seeded torch.Generator (CPU, float64): deterministic,
             no dependency. It is what the tests use.
  cma        CMA-ES from the ``cma`` package (mergekit-evolve's optimiser).
  nevergrad  Nevergrad's NGOpt (the PCB-ES reference's optimiser).
``auto`` picks cma, then nevergrad, then builtin, by what is importable; pass a name for reproducible runs
across environments.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..errors import BackendUnavailable, ConfigError

NAMES = ("auto", "builtin", "cma", "nevergrad")


class Optimizer:
    name = ""

    def ask(self) -> list[list[float]]:  # pragma: no cover - interface
        raise NotImplementedError

    def tell(self, xs: list[list[float]], scores: list[float]) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class OnePlusLambdaES(Optimizer):
    name = "builtin"

    def __init__(self, x0: Sequence[float], lower: Sequence[float], upper: Sequence[float], sigma: float,
                 popsize: int, seed: int, start_score: float):
        self.x = torch.tensor(list(x0), dtype=torch.float64)
        self.lo = torch.tensor(list(lower), dtype=torch.float64)
        self.hi = torch.tensor(list(upper), dtype=torch.float64)
        self.sigma = float(sigma)
        self.popsize = popsize
        self.score = start_score
        self.gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF)
        # step-size damping (Hansen's (1+lambda) rule of thumb)
        self.damping = 1.0 + self.x.numel() / (2.0 * popsize)

    def ask(self) -> list[list[float]]:
        z = torch.randn(self.popsize, self.x.numel(), generator=self.gen, dtype=torch.float64)
        width = self.hi - self.lo
        xs = torch.minimum(torch.maximum(self.x + self.sigma * width * z, self.lo), self.hi)
        return [row.tolist() for row in xs]

    def tell(self, xs: list[list[float]], scores: list[float]) -> None:
        better = sum(1 for s in scores if s > self.score)
        best = max(range(len(xs)), key=lambda i: scores[i])  # first of equal best: deterministic
        if scores[best] > self.score:
            self.x = torch.tensor(xs[best], dtype=torch.float64)
            self.score = scores[best]
        rate = better / len(xs)
        self.sigma *= math.exp((rate - 0.2) / (0.8 * self.damping))
        self.sigma = min(max(self.sigma, 1e-8), 1.0)


class CmaES(Optimizer):
    name = "cma"

    def __init__(self, x0, lower, upper, sigma, popsize, seed):
        import cma

        # cma works in a space scaled to the bounds' widths so one sigma fits every coordinate
        self.lo, self.width = list(lower), [h - l for l, h in zip(lower, upper)]
        z0 = [(x - l) / w for x, l, w in zip(x0, self.lo, self.width)]
        self.es = cma.CMAEvolutionStrategy(z0, sigma, {"bounds": [0.0, 1.0], "seed": int(seed) % (2**32 - 1) + 1,
                                                       "popsize": popsize, "verbose": -9})
        self._z = None

    def ask(self):
        self._z = self.es.ask()
        return [[l + w * float(v) for v, l, w in zip(z, self.lo, self.width)] for z in self._z]

    def tell(self, xs, scores):
        self.es.tell(self._z, [-s if math.isfinite(s) else 1e300 for s in scores])


class NevergradOpt(Optimizer):
    name = "nevergrad"

    def __init__(self, x0, lower, upper, budget, popsize, seed):
        import nevergrad as ng
        import numpy as np

        param = ng.p.Array(init=np.asarray(x0, dtype=float), lower=np.asarray(lower, dtype=float),
                           upper=np.asarray(upper, dtype=float))
        param.random_state = np.random.RandomState(int(seed) % (2**32))
        self.opt = ng.optimizers.NGOpt(parametrization=param, budget=max(budget, 1))
        self.popsize = popsize
        self._cands = None

    def ask(self):
        self._cands = [self.opt.ask() for _ in range(self.popsize)]
        return [[float(v) for v in c.value] for c in self._cands]

    def tell(self, xs, scores):
        for c, s in zip(self._cands, scores):
            self.opt.tell(c, -s if math.isfinite(s) else 1e300)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def make_optimizer(name: str, x0: Sequence[float], lower: Sequence[float], upper: Sequence[float], *,
                   sigma: float, popsize: int, budget: int, seed: int, start_score: float) -> Optimizer:
    """The optimiser ``name`` (see the module docstring) started at x0 inside [lower, upper]."""
    if name not in NAMES:
        raise ConfigError(f"search: optimizer must be one of {', '.join(NAMES)}, got {name!r}")
    if name == "auto":
        name = "cma" if _importable("cma") else "nevergrad" if _importable("nevergrad") else "builtin"
    if name in ("cma", "nevergrad") and not _importable(name):
        raise BackendUnavailable(f"search: optimizer '{name}' needs the '{name}' package (pip install {name}); "
                                 "optimizer='builtin' needs nothing")
    if name == "cma":
        return CmaES(x0, lower, upper, sigma, popsize, seed)
    if name == "nevergrad":
        return NevergradOpt(x0, lower, upper, budget, popsize, seed)
    return OnePlusLambdaES(x0, lower, upper, sigma, popsize, seed, start_score)


def check_bounds(x0: Sequence[float], lower: Sequence[float], upper: Sequence[float], what: str) -> None:
    for i, (x, lo, hi) in enumerate(zip(x0, lower, upper)):
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ConfigError(f"{what}: bounds of coordinate {i} must be finite with lower < upper, got ({lo}, {hi})")
        if not lo <= x <= hi:
            raise ConfigError(f"{what}: start value {x} of coordinate {i} is outside its bounds ({lo}, {hi})")
