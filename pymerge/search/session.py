"""Calls the user's evaluator, records every trial, tracks the best, and replays a previous run's history.

Every search here is deterministic given its seed and the scores it receives, so a search resumed with the
``result`` a ``SearchError`` carried regenerates the same candidates: their recorded scores are reused
(after checking the candidate is the one recorded) and the evaluator is called again only from the candidate
that failed onwards.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch

from ..errors import ConfigError
from .result import SearchError, SearchResult, Trial

log = logging.getLogger("pymerge")

Evaluate = Callable[[dict], float]


class Session:
    def __init__(self, method: str, evaluate: Evaluate, optimizer: str, resume: SearchResult | None = None):
        if not callable(evaluate):
            raise ConfigError(f"{method}: evaluate must be a callable state_dict -> float")
        if resume is not None and resume.method != method:
            raise ConfigError(f"{method}: cannot resume from a {resume.method} search")
        self.method = method
        self.evaluate = evaluate
        self.optimizer = optimizer
        self.replay = list(resume.history) if resume is not None else []
        self.history: list[Trial] = []
        self.best: Trial | None = None
        self._best_build: Callable[[], dict] | None = None  # rebuilds the best candidate's state dict

    def score(self, generation: int, index: int, x, params: dict[str, Any],
              build: Callable[[], dict[str, torch.Tensor]]) -> float:
        """Score of one candidate (from the replayed history, else from ``evaluate(build())``)."""
        x = tuple(float(v) for v in x)
        k = len(self.history)
        if k < len(self.replay):
            old = self.replay[k]
            if (old.generation, old.index) != (generation, index) or len(old.x) != len(x) or any(
                    abs(a - b) > 1e-9 * max(1.0, abs(a)) for a, b in zip(old.x, x)):
                raise ConfigError(f"{self.method}: resume history does not match this search at evaluation {k} "
                                  f"(recorded generation {old.generation} candidate {old.index} {old.params}, now "
                                  f"generation {generation} candidate {index} {params}); use the same inputs, "
                                  "settings and seed")
            value = old.score
        else:
            try:
                raw = self.evaluate(build())
                value = float(raw)
            except Exception as e:
                where = {"generation": generation, "index": index, "params": params}
                raise SearchError(f"{self.method}: evaluate() raised {type(e).__name__}: {e} on candidate {index} of "
                                  f"generation {generation} ({_show(params)}); the search so far is in "
                                  "error.result (pass it as resume= to continue)", candidate=where,
                                  result=self.partial()) from e
            if math.isnan(value):
                log.warning("%s: evaluate() returned NaN for candidate %d of generation %d; counted as -inf",
                            self.method, index, generation)
                value = -math.inf
        trial = Trial(generation, index, x, params, value)
        self.history.append(trial)
        if self.best is None or value > self.best.score:
            self.best = trial
            self._best_build = build
        return value

    def result(self, params: dict[str, Any] | None = None, build: Callable[[], dict] | None = None,
               score: float | None = None, complete: bool = True) -> SearchResult:
        """The best trial so far (or the given final params/build/score) as a SearchResult."""
        if self.best is None:
            return SearchResult(self.method, {}, -math.inf, -math.inf, list(self.history), {}, self.optimizer,
                                complete)
        start = self.history[0].score
        return SearchResult(self.method, params if params is not None else self.best.params,
                            score if score is not None else self.best.score, start, list(self.history),
                            (build or self._best_build)(), self.optimizer, complete)

    def partial(self) -> SearchResult:
        return self.result(complete=False)


def _show(params: dict[str, Any]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(u) for u in v) + "]"
        return repr(v)

    return ", ".join(f"{k}={fmt(v)}" for k, v in params.items())
