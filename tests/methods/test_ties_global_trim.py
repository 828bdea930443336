"""``ties`` with ``trim_scope: global`` on a single tensor: the paper's trim, i.e. keep every |tau| >= the k-th
largest with k = int(d * n) (ties all kept; no max(1, .) floor), then elect and take the disjoint mean."""

from __future__ import annotations

import math

import pytest
import torch

from pymerge.ops import merge_tensors

from . import reference as ref


def _global_keep(tau: torch.Tensor, density: float) -> torch.Tensor:
    n = tau.numel()
    k = n if density >= 1 else (int(density * n) if density > 0 else 0)
    return ref.topk_keep(tau, k, keep_all_ties=True)


@pytest.mark.parametrize("shape", [(1,), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("data", ["grid", "integers"])
def test_global_trim_single_tensor_equals_keep_all_ties_topk(shape, data):
    densities = [0.3, 0.001, 1.0, 0.0, 0.75]
    weights = [1.0, 0.5, -0.75, 2.0, 0.25]  # dyadic: integer data gives exact fp32 election sums (ties at 0 too)
    seed = 31 + shape[0]
    if data == "grid":
        base, experts = ref.family(shape, 5, seed)
    else:
        base, experts = ref.integer_family(shape, 5, seed, low=-2, high=2)
    mp = [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    for consensus, normalize, lam in [("sum", True, 1.0), ("count", False, 0.6)]:
        ours = merge_tensors("ties", [base, *experts], base_index=0, model_params=mp,
                             params={"trim_scope": "global", "consensus_method": consensus,
                                     "normalize": normalize, "lambda": lam})
        keeps = [_global_keep(e.double() - base.double(), d) for e, d in zip(experts, densities)]
        expected = ref.gta(base, experts, weights, keeps=keeps, consensus=consensus, normalize=normalize, lam=lam,
                           strict_election=data == "grid")
        ref.assert_matches(ours, expected)


def test_global_trim_keeps_every_tie_at_the_threshold():
    """|tau| in {1, 2} with 40 twos: density 0.25 of 100 (k = 25) keeps all 40 twos and no one."""
    base = torch.zeros(100)
    tau = torch.ones(100)
    tau[torch.arange(0, 100, 5)] = 2.0
    tau[torch.arange(1, 100, 5)] = -2.0
    ours = merge_tensors("ties", [base, base + tau], base_index=0, params={"trim_scope": "global"},
                         model_params=[{}, {"weight": 1.0, "density": 0.25}])
    assert torch.equal(ours, torch.where(tau.abs() == 2, tau, torch.zeros_like(tau)))
    assert int((ours != 0).sum()) == 40 != math.floor(0.25 * 100)
