"""``model_stock`` against its float64 oracle, per tensor and ``filter_wise`` (per vector of the last dim)."""

from __future__ import annotations

import pytest
import torch

from pymerge.errors import ConfigError
from pymerge.ops import merge_tensors

from . import reference as ref

SHAPES = [(1,), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shared", [0.0, 1.0])  # independent experts (t ~ 0) and correlated ones (t ~ 0.7)
def test_model_stock_matches_float64_oracle(shape, n, filter_wise, shared):
    base, experts = ref.family(shape, n, 60 + n + shape[0], shared=shared, zero_frac=0.05)
    base_index = n // 2
    inputs = list(experts)
    inputs.insert(base_index, base)
    ours = merge_tensors("model_stock", inputs, base_index=base_index, params={"filter_wise": filter_wise})
    ref.assert_matches(ours, ref.model_stock(base, experts, filter_wise))


def test_model_stock_opposite_task_vectors_keep_the_base():
    """N = 2 with tau_2 = -tau_1: c = -1, 1 + (N-1) c = 0 is singular and t = 0 (the base)."""
    base, (a,) = ref.family((31, 17), 1, 3)
    b = base - (a - base)
    ours = merge_tensors("model_stock", [base, a, b], base_index=0)
    assert torch.equal(ours, base)
    ours = merge_tensors("model_stock", [base, a, b], base_index=0, params={"filter_wise": True})
    assert torch.equal(ours, base)


def test_model_stock_filter_wise_rows_differ():
    """Rows with aligned task vectors move to the average, rows with orthogonal ones stay near the base."""
    base = torch.zeros(2, 4)
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 0.0]])
    ours = merge_tensors("model_stock", [base, a, b], base_index=0, params={"filter_wise": True})
    ref.assert_matches(ours, ref.model_stock(base, [a, b], True))
    assert torch.equal(ours[1], torch.zeros(4)) and torch.allclose(ours[0], a[0])


def test_model_stock_needs_two_experts():
    base, (a,) = ref.family((7,), 1, 3)
    with pytest.raises(ConfigError):
        merge_tensors("model_stock", [base, a], base_index=0)
