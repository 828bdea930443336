"""``linear`` and ``passthrough`` against their float64 oracles, every element."""

from __future__ import annotations

import pytest
import torch

from pymerge.errors import ConfigError
from pymerge.ops import merge_tensors

from . import reference as ref

SHAPES = [(), (1,), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)]
WEIGHTS = {1: [0.7], 2: [1.0, -0.4], 3: [0.5, 0.0, 1.25], 5: [1.0, -0.3, 0.0, 2.5, 0.45]}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_float64_oracle(shape, n, normalize):
    base, experts = ref.family(shape, n - 1, 40 + n)
    tensors = [base, *experts]
    weights = WEIGHTS[n]
    ours = merge_tensors("linear", tensors, params={"normalize": normalize},
                         model_params=[{"weight": w} for w in weights])
    assert ours.dtype == torch.float32
    ref.assert_matches(ours, ref.linear(tensors, weights, normalize))


def test_linear_default_normalizes():
    base, experts = ref.family((31, 17), 2, 3)
    ours = merge_tensors("linear", [base, *experts], model_params=[{"weight": w} for w in (1.0, 2.0, 0.5)])
    ref.assert_matches(ours, ref.linear([base, *experts], [1.0, 2.0, 0.5], normalize=True))


def test_linear_weights_summing_to_zero_is_an_error_when_normalizing():
    base, (other,) = ref.family((7,), 1, 3)
    mp = [{"weight": 1.0}, {"weight": -1.0}]
    with pytest.raises(ConfigError, match="sum to zero"):
        merge_tensors("linear", [base, other], model_params=mp)
    ours = merge_tensors("linear", [base, other], model_params=mp, params={"normalize": False})
    ref.assert_matches(ours, ref.linear([base, other], [1.0, -1.0], normalize=False))


def test_linear_requires_weights():
    base, (other,) = ref.family((7,), 1, 3)
    with pytest.raises(ConfigError, match="weight"):
        merge_tensors("linear", [base, other], model_params=[{"weight": 1.0}, {}])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("scale", [None, 0.5, -2.0, 0.0])
def test_passthrough_matches_oracle(shape, scale):
    x, _ = ref.family(shape, 0, 5)
    ours = merge_tensors("passthrough", [x], model_params=[{} if scale is None else {"scale": scale}])
    ref.assert_matches(ours, ref.passthrough(x, scale))
    if scale is None:
        assert torch.equal(ours, x)


def test_passthrough_takes_one_input_only():
    x, _ = ref.family((7,), 0, 5)
    from pymerge.methods import get_method

    assert get_method("passthrough").spec.max_inputs == 1
    assert torch.equal(merge_tensors("passthrough", [x.to(torch.bfloat16)]), x.to(torch.bfloat16).float())
