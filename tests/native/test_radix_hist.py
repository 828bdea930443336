"""pymerge._C radix histograms (via pymerge.ops.native_cpu) against torch.bincount of the twin's keys
(pymerge.ops.select.magnitude_keys), every bin, and the native thresholds against TopKSelector."""

from __future__ import annotations

import math

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason
from pymerge.ops.select import TopKSelector, magnitude_keys

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 65537, 200003]  # 200003: several 64K OpenMP blocks plus a ragged tail
BINS = 1 << 16


def _native():
    from pymerge.ops import native_cpu

    return native_cpu


def _data(n, dtype, seed, k=3):
    """k experts and a base with a spread of magnitudes (tiny to large) and exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-20, 20, (n,), generator=g).float())
    xs = [(torch.randn(n, generator=g) * scale).to(dtype) for _ in range(k)]
    base = (torch.randn(n, generator=g) * scale).to(dtype)
    if n > 10:
        xs[0][: n // 10] = xs[0][n // 2: n // 2 + n // 10]  # repeated values
    return xs, base


def _keys(x, base=None):
    return magnitude_keys(x.float() if base is None else x.float() - base.float()).reshape(-1)


def _assert_hist_equal(got, want, what):
    bad = torch.nonzero(got != want)
    assert bad.numel() == 0, (f"{what}: {bad.numel()} bins differ, first bin {int(bad[0])}: "
                              f"got {int(got[bad[0]])}, bincount {int(want[bad[0]])}")


def _busiest_bin(keys):
    return int(torch.bincount(keys >> 16, minlength=BINS).argmax())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_hi_and_lo_match_bincount(dtype, size, with_base):
    xs, base = _data(size, dtype, seed=size)
    b = base if with_base else None
    hist_hi = _native().radix_hist_hi(xs, base=b)
    assert hist_hi.shape == (len(xs), BINS) and hist_hi.dtype == torch.int64
    keys = [_keys(x, b) for x in xs]
    for j, key in enumerate(keys):
        _assert_hist_equal(hist_hi[j], torch.bincount(key >> 16, minlength=BINS), f"hi row {j}")
    # lo pass inside a populated bin of each input, and inside an empty one
    hi_bins = [_busiest_bin(keys[0]), _busiest_bin(keys[1]), 0x7FFF]
    hist_lo = _native().radix_hist_lo(xs, hi_bins, base=b)
    for j, key in enumerate(keys):
        inside = key[(key >> 16) == hi_bins[j]]
        _assert_hist_equal(hist_lo[j], torch.bincount(inside & 0xFFFF, minlength=BINS), f"lo row {j}")
    assert int(hist_lo[0].sum()) == int(hist_hi[0, hi_bins[0]])


def test_bf16_keys_have_zero_low_half():
    """Without a base, bfloat16 keys are bf16 bits << 16: the lo histogram puts everything in bin 0."""
    xs, _ = _data(5003, torch.bfloat16, seed=1, k=1)
    key = _keys(xs[0])
    hi = _busiest_bin(key)
    lo = _native().radix_hist_lo(xs, [hi])
    assert int(lo[0, 0]) == int((key >> 16 == hi).sum()) and int(lo[0, 1:].sum()) == 0


def test_special_values():
    """Zeros of both signs, infinities, subnormals, overflow to Inf in the difference, every bin exact."""
    vals = [0.0, -0.0, math.inf, -math.inf, 1e-45, -1e-40, 3e38, -3e38, 1.0, -1.0, 65504.0, 6e-8, -6e-8]
    for dtype in DTYPES:
        x = torch.tensor(vals * 3).to(dtype)
        base = torch.tensor(vals[::-1] * 3).to(dtype)
        for b in (None, base):
            key = _keys(x, b)
            got = _native().radix_hist_hi([x], base=b)[0]
            _assert_hist_equal(got, torch.bincount(key >> 16, minlength=BINS), f"{dtype} hi")
            for hi in torch.unique(key >> 16).tolist():
                lo = _native().radix_hist_lo([x], [hi], base=b)[0]
                want = torch.bincount(key[(key >> 16) == hi] & 0xFFFF, minlength=BINS)
                _assert_hist_equal(lo, want, f"{dtype} lo bin {hi:#x}")


def test_nan_keys_sort_above_inf():
    """NaN payloads are not reproducible across torch's code paths (see dtype_cast.h), so NaN is checked as a
    class: every NaN lands in a bin above +Inf's, and nothing else does."""
    x = torch.tensor([math.nan, -math.nan, 1.0, math.inf, -math.inf, 2.0, math.nan])
    base = torch.tensor([0.0, 1.0, math.nan, math.inf, 1.0, -math.inf, math.nan])
    for b, nans in ((None, 3), (base, 5)):  # inf - inf is NaN too
        hist = _native().radix_hist_hi([x], base=b)[0]
        inf_bin = 0x7F800000 >> 16
        assert int(hist[inf_bin + 1:].sum()) == nans and int(hist.sum()) == 7


def test_accumulates_into_given_histogram():
    xs, base = _data(70001, torch.float16, seed=2, k=2)
    hist = _native().radix_hist_hi(xs, base=base)
    again = _native().radix_hist_hi(xs, base=base, hist=hist.clone())
    assert torch.equal(again, 2 * hist)
    # chunks accumulate to the whole
    parts = torch.zeros(2, BINS, dtype=torch.int64)
    for a, b in ((0, 12345), (12345, 70001)):
        _native().radix_hist_hi([x[a:b] for x in xs], base=base[a:b], hist=parts)
    assert torch.equal(parts, hist)


@pytest.mark.parametrize("dtype", DTYPES)
def test_thresholds_match_topk_selector(dtype):
    n = 100003
    xs, base = _data(n, dtype, seed=7, k=5)
    xs[4] = torch.randint(-3, 4, (n,), generator=torch.Generator().manual_seed(1)).to(dtype)  # heavy ties
    densities = [0.3, 1.0, 1e-6, 0.0, 0.5]
    ths = _native().ties_thresholds(base, xs, densities)
    keys = torch.stack([_keys(x, base) for x in xs])
    ks = [_native().topk_count(d, n) for d in densities]
    sel = TopKSelector(ks, n)
    sel.add_hi(keys)
    sel.end_hi()
    sel.add_lo(keys)
    for j, (got, want) in enumerate(zip(ths, sel.end_lo())):
        assert (got.key, got.ties) == (want.key, want.ties), f"expert {j}"
        equal = int((keys[j] == got.key).sum())
        assert got.keep_all_ties == (got.ties == equal and 0 < ks[j] < n), f"expert {j}"
        if 0 < ks[j] < n:
            assert int((keys[j] > got.key).sum()) + got.ties == ks[j]


def test_argument_errors():
    x = torch.zeros(16)
    hist = torch.zeros(1, BINS, dtype=torch.int64)
    with pytest.raises(ValueError, match="at least one input"):
        _C.radix_hist_hi([], 0, 16, hist.data_ptr())
    with pytest.raises(ValueError, match=r"x_ptrs\[0\]: null pointer"):
        _C.radix_hist_hi([0], 0, 16, hist.data_ptr())
    with pytest.raises(ValueError, match="hist_ptr: null pointer"):
        _C.radix_hist_hi([x.data_ptr()], 0, 16, 0)
    with pytest.raises(ValueError, match="8-byte aligned"):
        _C.radix_hist_hi([x.data_ptr()], 0, 16, hist.data_ptr() + 4)
    with pytest.raises(ValueError, match="dtype: unknown dtype code"):
        _C.radix_hist_hi([x.data_ptr()], 5, 16, hist.data_ptr())
    with pytest.raises(ValueError, match="overlaps the histogram"):
        _C.radix_hist_hi([hist.data_ptr()], 0, 16, hist.data_ptr())
    with pytest.raises(ValueError, match="base_ptr: overlaps"):
        _C.radix_hist_hi([x.data_ptr()], 0, 16, hist.data_ptr(), hist.data_ptr())
    with pytest.raises(ValueError, match=r"hi_bins\[0\]: must be in"):
        _C.radix_hist_lo([x.data_ptr()], 0, 16, [65536], hist.data_ptr())
    with pytest.raises(ValueError, match="hi_bins: got 2 bins for 1 inputs"):
        _C.radix_hist_lo([x.data_ptr()], 0, 16, [0, 1], hist.data_ptr())
    with pytest.raises(ValueError, match="hist: expected an int64 tensor"):
        _native().radix_hist_hi([x], hist=torch.zeros(2, BINS, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        _native().radix_hist_hi([x, torch.zeros(15)])
    with pytest.raises(TypeError, match="not supported"):
        _native().radix_hist_hi([x.double()])
    with pytest.raises(ValueError, match=r"densities\[0\]: must be >= 0"):
        _native().ties_thresholds(x, [x], [-0.5])
