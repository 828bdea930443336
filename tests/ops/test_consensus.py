"""sign_consensus (TIES "elect") against a float64 formula, for both election methods."""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import sign_consensus


def reference_consensus(deltas: torch.Tensor, method: str) -> torch.Tensor:
    """agree[t] = sgn(d_t) == gamma, gamma = +1 where sum_t d_t >= 0 ("sum") or sum_t sgn(d_t) >= 0 ("count")."""
    d = deltas.double()
    total = d.sum(0) if method == "sum" else d.sign().sum(0)
    gamma = torch.where(total >= 0, 1.0, -1.0).double()
    return d.sign() == gamma


@pytest.mark.parametrize("method", ["sum", "count"])
@pytest.mark.parametrize("shape", [(1, 7), (2, 31, 17), (3, 13, 1), (5, 3, 5, 7)])
def test_sign_consensus_matches_float64(method, shape):
    g = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    # small integers: fp32 sums are exact, so exact zero sums (ties) occur often and are compared exactly
    deltas = torch.randint(-3, 4, shape, generator=g).float()
    got = sign_consensus(deltas, method)
    assert got.dtype == torch.bool and got.shape == deltas.shape
    assert torch.equal(got, reference_consensus(deltas, method))
    assert not bool(got[deltas == 0].any()), "a zero delta never agrees"


def test_ties_at_zero_elect_plus():
    deltas = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, -1.0]])
    # sums: 0, 0, 0, 1 -> all +;  sign sums: 0, 0, 0, -1 -> +, +, +, -
    assert torch.equal(sign_consensus(deltas, "sum"),
                       torch.tensor([[True, False, False, True], [False, True, False, False],
                                     [False, False, False, False]]))
    assert torch.equal(sign_consensus(deltas, "count"),
                       torch.tensor([[True, False, False, False], [False, True, False, True],
                                     [False, False, False, True]]))


def test_sum_and_count_can_disagree():
    deltas = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert torch.equal(sign_consensus(deltas, "sum").reshape(-1), torch.tensor([True, False, False]))
    assert torch.equal(sign_consensus(deltas, "count").reshape(-1), torch.tensor([False, True, True]))


def test_negative_zero_never_agrees():
    deltas = torch.tensor([[-0.0, 1.0], [0.0, -0.0]])
    assert torch.equal(sign_consensus(deltas, "sum"), torch.tensor([[False, True], [False, False]]))


def test_unknown_method():
    with pytest.raises(ValueError):
        sign_consensus(torch.zeros(2, 3), "max")
