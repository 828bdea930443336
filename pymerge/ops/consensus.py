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
        elected = torch.where(stack_sum(deltas) >= 0, 1.0, -1.0)
    elif method == "count":
        elected = torch.where(stack_sum(sign) >= 0, 1.0, -1.0)
    else:
        raise ValueError(f"unknown consensus method {method!r} (expected 'sum' or 'count')")
    return sign == elected


def stack_sum(x: torch.Tensor) -> torch.Tensor:
    """sum over dim 0, accumulated strictly in index order: x[0] + x[1] + ... .

    ``torch.sum(dim=0)`` picks its accumulation order from the tensor's shape, so the same element could round
    differently in a chunk of one row and in a chunk of many; merges must not depend on chunking.
    """
    if x.shape[0] == 0:
        return torch.zeros(x.shape[1:], dtype=x.dtype)
    acc = x[0].clone()
    for i in range(1, x.shape[0]):
        acc += x[i]
    return acc
