"""pymerge.triton_kernels.keep_mask against the torch Philox twin (pymerge.ops.philox.keep_mask), every element:
64-bit seeds, model words past 2^31, every start phase, odd counts, scalar and per-element probabilities.
Interpreter on CPU without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'pymerge[triton]')")

from pymerge.ops.philox import keep_mask as torch_keep_mask  # noqa: E402

from ._interp import DEVICE, load  # noqa: E402

km = load("keep_mask")


@pytest.mark.parametrize("seed,model,start,count", [
    (0, 0, 0, 1), (7, 1, 1, 5), (2**40 + 3, 2**31 + 5, 2, 1031), (2**64 - 1, 2**32 - 1, 3, 4099),
    (123, 17, 10**9 + 1, 2050),
])
@pytest.mark.parametrize("prob", [0.0, 0.3, 0.9999, 1.0, 1.5, -0.25])
def test_scalar_probability_matches_the_twin(seed, model, start, count, prob):
    got = km.keep_mask(seed, model, "model.layers.0.mlp.up_proj.weight", start, count, prob, device=DEVICE)
    want = torch_keep_mask(seed, model, "model.layers.0.mlp.up_proj.weight", start, count, prob)
    assert got.dtype == torch.bool and got.shape == (count,)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("start,count", [(0, 1), (1, 1027), (6, 3001)])
def test_per_element_probabilities_match_the_twin(start, count):
    g = torch.Generator().manual_seed(count)
    prob = torch.rand(count, generator=g) * 1.2 - 0.1  # some below 0 and above 1
    prob[::7] = 0.5  # a repeated value
    got = km.keep_mask(99, 3, "w", start, count, prob.to(DEVICE), device=DEVICE)
    assert torch.equal(got.cpu(), torch_keep_mask(99, 3, "w", start, count, prob))


def test_empty_and_argument_errors():
    assert km.keep_mask(1, 1, "w", 5, 0, 0.5, device=DEVICE).shape == (0,)
    with pytest.raises(ValueError, match="prob"):
        km.keep_mask(1, 1, "w", 0, 4, torch.zeros(3, device=DEVICE), device=DEVICE)
    with pytest.raises(ValueError, match="prob"):
        km.keep_mask(1, 1, "w", 0, 4, float("nan"), device=DEVICE)
    with pytest.raises(ValueError, match="start"):
        km.keep_mask(1, 1, "w", -1, 4, 0.5, device=DEVICE)
