"""Sign consensus (TIES "elect"): which experts agree with the elected sign at each element."""

from __future__ import annotations

import torch


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Mask[t, ...] = sgn(deltas[t]) == gamma, where gamma = +1 if sum_t deltas[t] >= 0 else -1 ("sum"),
    or +1 if sum_t sgn(deltas[t]) >= 0 else -1 ("count"). Zero deltas never agree.

    ``deltas`` are the (already weighted) task vectors stacked on dim 0, as in mergekit's TIES.
    """
    sign = torch.sign(deltas)
    if method == "sum":
        elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    elif method == "count":
        elected = torch.where(sign.sum(dim=0) >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"unknown consensus method {method!r} (expected 'sum' or 'count')")
    return sign == elected
