"""In-memory merge search with a user evaluator: ``evaluate(state_dict) -> float`` (higher is better).

    >>> from pymerge import search
    >>> result = search.lambda_search(base_sd, [sd_a, sd_b], evaluate, method="pcb", budget=60, seed=0)
    >>> result.params["lambdas"], result.score, result.state_dict

Task vectors stay resident (on the device of the given tensors) and every candidate is re-merged in memory:
  lambda_search  per-task coefficients of task arithmetic / TIES / PCB (PCB-ES), searched by an ES;
  nps            NPS: magnitude-bin re-weighting + top-k keep, bin weights (and lambdas) searched by an ES;
  evolver        Evolver: differential evolution of the experts through an averaging merger.
An evaluator exception becomes a ``SearchError`` naming the candidate and carrying the search so far
(``error.result``); passing that back as ``resume=`` continues where it stopped. See docs/search.md.
"""

from .evolver import evolver
from .lambda_search import lambda_search
from .nps import nps
from .result import SearchError, SearchResult, Trial

__all__ = ["evolver", "lambda_search", "nps", "SearchError", "SearchResult", "Trial"]
