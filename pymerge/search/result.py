"""What a search returns (``SearchResult``), what it records per evaluation (``Trial``), and the error that
carries the search so far when the user's evaluator fails (``SearchError``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PymergeError


@dataclass(frozen=True)
class Trial:
    """One evaluated candidate: its place in the search, its parameters and its score (higher is better).

    ``x`` is the flat vector the optimizer proposed (what a resumed search checks it regenerates);
    ``params`` names its parts (e.g. ``{"lambdas": [...]}``).
    """

    generation: int  # 0: the starting point; 1, 2, ...: the search's generations
    index: int  # position of the candidate inside its generation
    x: tuple[float, ...]
    params: dict[str, Any]
    score: float


@dataclass
class SearchResult:
    """The best candidate found: parameters, score, every evaluation in order, and its merged state dict."""

    method: str
    params: dict[str, Any]
    score: float
    start_score: float
    history: list[Trial] = field(default_factory=list)
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: str = ""
    complete: bool = True  # False on the partial result a SearchError carries

    @property
    def evaluations(self) -> int:
        return len(self.history)

    @property
    def improvement(self) -> float:
        """best score - score of the starting point."""
        return self.score - self.start_score


class SearchError(PymergeError):
    """The evaluator failed on a candidate. ``candidate`` says which (generation, index, params); ``result``
    holds the search so far (best candidate and its state dict, full history), and passing it back as
    ``resume=`` replays the recorded scores and continues from the failed candidate."""

    def __init__(self, message: str, *, candidate: dict[str, Any], result: SearchResult | None):
        super().__init__(message)
        self.candidate = candidate
        self.result = result
