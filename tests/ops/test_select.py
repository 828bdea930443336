"""Exact top-k by magnitude (pymerge.ops.select) against a float64 stable argsort: every n and k edge, heavy
ties, zeros, negative zeros, infinities, values sharing the high 16 bits; chunked selection; NaN policy."""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import TieCursor, TopKSelector, magnitude_keys, topk_mask


def reference_topk(x: torch.Tensor, k: int, keep_all_ties: bool = False) -> torch.Tensor:
    """The k largest |x| by a float64 stable sort (lowest flat index first among equal magnitudes)."""
    mags = x.reshape(-1).double().abs()
    n = mags.numel()
    keep = torch.zeros(n, dtype=torch.bool)
    if k > 0:
        order = torch.sort(mags, descending=True, stable=True).indices
        keep[order[:min(k, n)]] = True
        if keep_all_ties:
            keep |= mags >= mags[order[min(k, n) - 1]]
    return keep.reshape(x.shape)


def _data(kind: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=g)
    if kind == "integers":  # heavy ties: magnitudes in {0, 1, 2, 3}
        return torch.randint(-3, 4, (n,), generator=g).float()
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "signed_zeros":  # +0 and -0 are the same magnitude; a few ones above them
        x = torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0)
        x[torch.rand(n, generator=g) < 0.1] = 1.0
        return x
    if kind == "infinities":
        x = torch.randn(n, generator=g)
        pick = torch.rand(n, generator=g)
        x[pick < 0.1] = float("inf")
        x[pick > 0.9] = -float("inf")
        return x
    if kind == "same_high_bits":  # 1 + j * 2**-23: one high-16-bit bin, the low pass decides
        j = torch.randint(0, 64, (n,), generator=g)
        return (1.0 + j.double() * 2.0**-23).float() * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    if kind == "tiny":  # subnormals and normals around them
        return torch.randn(n, generator=g) * 1e-38
    raise ValueError(kind)


KINDS = ["normal", "integers", "zeros", "signed_zeros", "infinities", "same_high_bits", "tiny"]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 4099])
@pytest.mark.parametrize("kind", KINDS)
def test_topk_mask_matches_stable_argsort(kind, n):
    x = _data(kind, n, n)
    for k in sorted({0, 1, n // 3, n - 1, n}):
        got = topk_mask(x, k)
        assert torch.equal(got, reference_topk(x, k)), k
        assert int(got.sum()) == k
    for k in sorted({1, n // 3}):  # keep-all-ties: interior thresholds are the interesting ones
        assert torch.equal(topk_mask(x, k, keep_all_ties=True), reference_topk(x, k, True)), k


def test_topk_mask_keeps_shape_and_flat_order():
    x = torch.ones(5, 7)
    got = topk_mask(x, 10)
    assert got.shape == (5, 7)
    assert torch.equal(got.reshape(-1), torch.arange(35) < 10)


def test_topk_k_beyond_n_keeps_all():
    x = torch.randn(9)
    assert topk_mask(x, 50).all()
    assert not topk_mask(x, 0).any()


def test_magnitude_keys_are_monotone():
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 1.0, -1.5, 3e38, float("inf"), -float("inf")])
    keys = magnitude_keys(x)
    assert keys.dtype == torch.int32
    order = torch.argsort(x.double().abs(), stable=True)
    assert bool((keys[order][1:] >= keys[order][:-1]).all())
    assert keys[0] == keys[1] == 0


def test_nan_policy():
    """Pinned behaviour: |NaN| keys (0x7fc00000..) sort above +Inf, so NaN is selected first (a NaN task-vector
    entry is always kept by top-k trimming), with the sign bit ignored."""
    x = torch.tensor([1.0, float("nan"), 3.0, -float("inf"), 2.0, -float("nan")])
    assert torch.equal(topk_mask(x, 1), torch.tensor([False, True, False, False, False, False]))
    assert torch.equal(topk_mask(x, 2), torch.tensor([False, True, False, False, False, True]))
    assert torch.equal(topk_mask(x, 3), torch.tensor([False, True, False, True, False, True]))
    assert torch.equal(topk_mask(x, 1, keep_all_ties=True), torch.tensor([False, True, False, False, False, True]))


def _chunked_select(x: torch.Tensor, ks: list[int], cuts: list[int], src=None, keep_all_ties=False):
    """Masks of the selections ``ks`` over the rows of ``x`` (``src``: which row each one reads), fed to
    TopKSelector and TieCursor chunk by chunk along the columns at ``cuts``."""
    keys = magnitude_keys(x)
    sel = TopKSelector(list(ks), x.shape[1], src=list(src or []), keep_all_ties=keep_all_ties)
    bounds = list(zip(cuts, cuts[1:]))
    for a, b in bounds:
        sel.add_hi(keys[:, a:b])
    sel.end_hi()
    for a, b in bounds:
        sel.add_lo(keys[:, a:b])
    ths = sel.end_lo()
    cursor = TieCursor(len(ks))
    rows = sel.src
    out = []
    for i, row in enumerate(rows):
        out.append(torch.cat([cursor.mask(i, keys[row, a:b], ths[i]) for a, b in bounds]))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["normal", "integers", "same_high_bits", "signed_zeros"])
def test_topk_selector_chunked_equals_one_chunk(kind):
    n = 301
    x = torch.stack([_data(kind, n, s) for s in range(3)])
    ks = [0, 1, 100, 300, 301, 150]
    src = [0, 0, 1, 1, 2, 2]
    one = _chunked_select(x, ks, [0, n], src)
    for s, ref_k in enumerate(ks):
        assert torch.equal(one[s], reference_topk(x[src[s]], ref_k))
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        inner = sorted(set(torch.randint(1, n, (7,), generator=g).tolist()))
        cuts = [0, *inner, n]
        assert torch.equal(_chunked_select(x, ks, cuts, src), one)
        assert torch.equal(_chunked_select(x, ks, cuts, src, keep_all_ties=True),
                           _chunked_select(x, ks, [0, n], src, keep_all_ties=True))


@pytest.mark.parametrize("kind", ["integers", "same_high_bits"])
def test_topk_selector_one_element_chunks(kind):
    """Chunks of one element: the histograms and the tie cursor carry across every boundary."""
    n = 41
    x = torch.stack([_data(kind, n, s) for s in range(2)])
    ks, src = [1, 13, 40], [0, 1, 1]
    one = _chunked_select(x, ks, [0, n], src)
    assert torch.equal(_chunked_select(x, ks, list(range(n + 1)), src), one)
    for s, k in enumerate(ks):
        assert torch.equal(one[s], reference_topk(x[src[s]], k))
