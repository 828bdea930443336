"""``slerp`` against its float64 oracle: random, correlated, (anti)collinear and zero inputs, t inside and
outside [0, 1], every element."""

from __future__ import annotations

import pytest
import torch

from pymerge.errors import ConfigError
from pymerge.ops import merge_tensors

from . import reference as ref

SHAPES = [(1,), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)]


def _pair(kind: str, shape, seed: int):
    base, (b,) = ref.family(shape, 1, seed, spread=1.0)
    if kind == "random":  # independent: cos ~ 0
        b = ref.family(shape, 0, seed + 1)[0]
    elif kind == "correlated":  # cos ~ 0.9
        pass
    elif kind == "collinear":
        b = base * 2
    elif kind == "anticollinear":
        b = base * -0.5
    elif kind == "zero_a":
        base = torch.zeros(shape)
    return base, b


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["random", "correlated", "collinear", "anticollinear", "zero_a"])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, -0.25, 1.4])
def test_slerp_matches_float64_oracle(shape, kind, t):
    a, b = _pair(kind, shape, 50 + shape[0])
    for base_index in (0, 1):  # t = 0 is the base wherever it sits in the input list
        inputs = [a, b] if base_index == 0 else [b, a]
        ours = merge_tensors("slerp", inputs, base_index=base_index, params={"t": t})
        ref.assert_matches(ours, ref.slerp(a, b, t))
    if t == 0.0:
        assert torch.equal(merge_tensors("slerp", [a, b], base_index=0, params={"t": 0.0}), a)


def test_slerp_needs_base_and_one_model():
    a, (b, c) = ref.family((7,), 2, 1)
    with pytest.raises(ConfigError):
        merge_tensors("slerp", [a, b, c], base_index=0, params={"t": 0.5})
    with pytest.raises(ConfigError):
        merge_tensors("slerp", [a, b], params={"t": 0.5})
    with pytest.raises(ConfigError, match="'t'"):
        merge_tensors("slerp", [a, b], base_index=0)
