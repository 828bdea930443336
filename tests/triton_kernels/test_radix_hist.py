"""pymerge.triton_kernels.radix_hist against torch.bincount of the magnitude keys (every bin), hi and lo
passes, with and without a base, accumulated over chunks. Interpreter on CPU without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'pymerge[triton]')")

from pymerge.ops.select import magnitude_keys  # noqa: E402

from ._interp import DEVICE, load  # noqa: E402

rh = load("radix_hist")
BINS = 1 << 16


def keys_of(xs, base):
    return [magnitude_keys(x.float() - base.float() if base is not None else x.float()).reshape(-1).long()
            for x in xs]


def data(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    # magnitudes over many binades, some exact zeros and repeated values
    xs = [(base.float() + torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 4, (n,), generator=g).float()))
          .to(dtype) for _ in range(k)]
    xs[0][:: 5] = base[:: 5]
    return base, xs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 1), (7, 2), (1025, 3), (4099, 2)])
@pytest.mark.parametrize("with_base", [True, False])
def test_hi_and_lo_match_bincount(dtype, n, k, with_base):
    base, xs = data(n, k, dtype, seed=n + k)
    b = base if with_base else None
    keys = keys_of(xs, b)
    hist = rh.radix_hist_hi([x.to(DEVICE) for x in xs], base=None if b is None else b.to(DEVICE)).cpu()
    want = torch.stack([torch.bincount(kk >> 16, minlength=BINS) for kk in keys])
    assert hist.dtype == torch.int64 and torch.equal(hist, want)
    # the lo pass inside a bin that holds keys (the most populated one) and one that holds none
    bins = [int(torch.argmax(want[j])) for j in range(k)]
    bins[-1] = (bins[-1] + 1) % BINS if want[-1, (bins[-1] + 1) % BINS] == 0 else bins[-1]
    lo = rh.radix_hist_lo([x.to(DEVICE) for x in xs], bins, base=None if b is None else b.to(DEVICE)).cpu()
    want_lo = torch.stack([torch.bincount(kk[(kk >> 16) == bj] & 0xFFFF, minlength=BINS)
                           for kk, bj in zip(keys, bins)])
    assert torch.equal(lo, want_lo)


def test_accumulates_over_chunks_and_takes_a_stack():
    base, xs = data(3001, 3, torch.bfloat16, seed=3)
    stack = torch.stack(xs).to(DEVICE)
    whole = rh.radix_hist_hi(stack, base=base.to(DEVICE))
    hist = torch.zeros(3, BINS, dtype=torch.int64, device=DEVICE)
    for a, b in ((0, 1000), (1000, 1001), (1001, 3001)):
        out = rh.radix_hist_hi(stack[:, a:b].contiguous(), base=base[a:b].to(DEVICE), hist=hist)
        assert out is hist
    assert torch.equal(hist.cpu(), whole.cpu())
    assert int(whole.sum()) == 3 * 3001


def test_takes_a_stack_with_its_own_row_stride():
    """The GPU executor hands over a chunk's first rows of a larger buffer: a [k, rows, cols] view whose experts
    are contiguous but whose stack is not. It is read in place, with the same counts as a contiguous copy."""
    base, xs = data(37 * 29, 3, torch.bfloat16, seed=5)
    buf = torch.zeros(3, 41, 29, dtype=torch.bfloat16, device=DEVICE)
    buf[:, :37] = torch.stack(xs).reshape(3, 37, 29).to(DEVICE)
    view = buf[:, :37]
    assert not view.is_contiguous() and view[0].is_contiguous()
    got = rh.radix_hist_hi(view, base=base.reshape(37, 29).to(DEVICE))
    want = torch.stack([torch.bincount(kk >> 16, minlength=BINS) for kk in keys_of(xs, base)])
    assert torch.equal(got.cpu(), want)
    with pytest.raises(ValueError, match=r"xs\[0\]: expected a contiguous"):
        rh.radix_hist_hi(buf.transpose(1, 2), base=torch.zeros(29, 41, dtype=torch.bfloat16, device=DEVICE))


def test_argument_errors():
    a = torch.randn(5, device=DEVICE)
    with pytest.raises(ValueError, match="hist"):
        rh.radix_hist_hi([a], hist=torch.zeros(2, BINS, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"hi_bins\[0\]"):
        rh.radix_hist_lo([a], [BINS])
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        rh.radix_hist_hi([a, a.half()])
