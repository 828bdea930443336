"""``sce`` against its float64 oracle: select_topk < 1 (variance top-k), = 1 and <= 0, the 1e-6 uniform-weights
rule, heavy variance ties (exact in fp32 for two integer experts), every element."""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import merge_tensors

from . import reference as ref

SHAPES = [(1,), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)]


def _inputs(base, experts, base_index):
    inputs = list(experts)
    inputs.insert(base_index, base)
    return inputs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.001])
def test_sce_matches_float64_oracle(shape, n, topk):
    base, experts = ref.family(shape, n, 71 + 3 * n + shape[0], zero_frac=0.1)
    base_index = min(1, n)
    ours = merge_tensors("sce", _inputs(base, experts, base_index), base_index=base_index,
                         params={"select_topk": topk})
    ref.assert_matches(ours, ref.sce(base, experts, topk))


@pytest.mark.parametrize("topk", [0.0, -1.0])
def test_sce_nonpositive_topk_keeps_the_base(topk):
    base, experts = ref.family((31, 17), 3, 5)
    ours = merge_tensors("sce", [base, *experts], base_index=0, params={"select_topk": topk})
    ref.assert_matches(ours, ref.sce(base, experts, topk))
    assert torch.equal(ours, base)


def test_sce_tiny_task_vectors_use_uniform_weights():
    """sum_t mean(tau_t^2) < 1e-6: the weights are 1/T (here the energies differ by 100x)."""
    base, experts = ref.family((64, 33), 3, 8, spread=1.0)
    experts = [ref.on_grid(base.double() + (e.double() - base.double()) * s)
               for e, s in zip(experts, (1e-4, 1e-3, 1e-4))]
    tau_energy = sum(float(((e.double() - base.double()) ** 2).mean()) for e in experts)
    assert tau_energy < 1e-6
    ours = merge_tensors("sce", [base, *experts], base_index=0, params={"select_topk": 0.4})
    ref.assert_matches(ours, ref.sce(base, experts, 0.4))


@pytest.mark.parametrize("shape", [(31, 17), (64, 33), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("topk", [0.5, 0.1])
def test_sce_heavy_variance_ties_break_by_lowest_index(shape, topk):
    """Two integer experts: fp32 variances ((a - b) / 2)^2 are exact, so ties are exact ties in both."""
    base, experts = ref.integer_family(shape, 2, 90 + shape[0], low=-2, high=2)
    ours = merge_tensors("sce", [base, *experts], base_index=0, params={"select_topk": topk})
    ref.assert_matches(ours, ref.sce(base, experts, topk, guard_ties=False))
