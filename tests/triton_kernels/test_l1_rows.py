"""pymerge.triton_kernels.l1_rows against its twin, every bit: the keep mask of pymerge.ops.philox and the
fp64 lane order of exact_sum.lane_row_sums (which the native CPU L1 pass shares). Odd shapes (columns not a
multiple of 8, one row, one column), every start phase, three dtypes, scalar and per-element probabilities,
NaN rows. Interpreter on CPU without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'pymerge[triton]')")

from pymerge.ops.exact_sum import lane_row_sums  # noqa: E402
from pymerge.ops.philox import keep_mask  # noqa: E402

from ._interp import DEVICE, load  # noqa: E402

l1 = load("l1_rows")


def twin(base, x, seed, model, name, start, prob):
    rows, cols = base.shape
    a = (x.float() - base.float()).abs()
    keep = keep_mask(seed, model, name, start, rows * cols, prob).reshape(rows, cols)
    return torch.stack([lane_row_sums(a), lane_row_sums(a * keep.float())], dim=1)


def same_bits(got, want):
    return torch.equal(got.view(torch.int64), want.view(torch.int64)) or bool(
        ((got == want) | (torch.isnan(got) & torch.isnan(want))).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,cols,start", [(1, 1, 0), (3, 7, 1), (37, 129, 2), (70, 64, 3), (5, 1003, 4099)])
def test_matches_the_twin(dtype, rows, cols, start):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    x = (base.float() + torch.randn(rows, cols, generator=g) * torch.exp2(
        torch.randint(-12, 2, (rows, cols), generator=g).float())).to(dtype)
    x[0, ::3] = base[0, ::3]  # exact zeros
    for prob in (0.0, 0.3, 1.0):
        got = l1.l1_rows(base.to(DEVICE), x.to(DEVICE), seed=2**40 + 7, model=2**31 + 3, tensor_name="w",
                         start=start, prob=prob).cpu()
        assert got.dtype == torch.float64 and got.shape == (rows, 2)
        assert same_bits(got, twin(base, x, 2**40 + 7, 2**31 + 3, "w", start, prob)), prob


def test_per_element_probabilities_and_nan_rows():
    g = torch.Generator().manual_seed(5)
    rows, cols = 9, 301
    base = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
    x = (base.float() + torch.randn(rows, cols, generator=g) * 0.01).to(torch.bfloat16)
    x[4, 17] = float("nan")
    prob = torch.rand(rows * cols, generator=g)
    got = l1.l1_rows(base.to(DEVICE), x.to(DEVICE), seed=3, model=1, tensor_name="layer.w", start=12,
                     prob=prob.to(DEVICE)).cpu()
    want = twin(base, x, 3, 1, "layer.w", 12, prob)
    assert same_bits(got, want)
    assert torch.isnan(got[4]).all() and not torch.isnan(got[[0, 1, 2, 3, 5, 6, 7, 8]]).any()


def test_argument_errors():
    a = torch.zeros(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="x:"):
        l1.l1_rows(a, torch.zeros(3, 2, device=DEVICE), seed=1, model=1, tensor_name="w", start=0, prob=0.5)
    with pytest.raises(ValueError, match="prob"):
        l1.l1_rows(a, a, seed=1, model=1, tensor_name="w", start=0, prob=torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="start"):
        l1.l1_rows(a, a, seed=1, model=1, tensor_name="w", start=-2, prob=0.5)
