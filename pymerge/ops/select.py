"""Exact top-k by magnitude over chunks: 16+16-bit radix histograms of the |x| fp32 bit pattern.

For x in fp32, the int32 bit pattern of |x| is monotone in |x| (NaN, 0x7fc00000.., sorts above +Inf), so the
k-th largest magnitude is found exactly by two histogram passes over the data, whatever its size:
  pass "hi": 65,536-bin histogram of key >> 16 -> the bin holding the k-th largest key;
  pass "lo": histogram of key & 0xFFFF inside that bin -> the exact threshold key T.
Then ``#(key > T) = above`` and ``ties = k - above`` elements equal to T are kept, chosen by lowest flat index
("exactly k" mode), or all of them ("keep all ties" mode). The mask pass walks the chunks in order and counts
ties already seen, which is what makes the result independent of the chunking.

This is the pure-torch twin of the native radix-select kernels; ``select_reference`` in the tests is a
float64 stable argsort.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

BINS = 1 << 16


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys monotone in |x| for fp32 ``x`` (the bit pattern of |x|)."""
    return x.to(torch.float32).abs().view(torch.int32)


class TopWalk:
    """Walks a histogram down from its top bin: one cumulative sum, then a binary search per rank."""

    def __init__(self, hist: np.ndarray):
        # In numpy: the torch flip/cumsum/nonzero chain cost ~2 ms per 65,536-bin histogram, a quarter of a whole
        # native TIES merge of the demo preset.
        self.hist = hist
        self.below = np.cumsum(hist[::-1])  # below[i] = count of bins >= size - 1 - i
        self.total = int(self.below[-1])

    def bin(self, k: int) -> tuple[int, int]:
        """(b, count(bins > b)) for the highest bin b with count(bins >= b) >= k; needs 1 <= k <= total."""
        i = int(np.searchsorted(self.below, k, side="left"))
        return self.hist.size - 1 - i, int(self.below[i - 1]) if i > 0 else 0

    def count(self, b: int) -> int:
        return int(self.hist[b])


def _walk_down(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Highest bin b such that count(bins >= b) >= k; returns (b, count(bins > b)). Needs 1 <= k <= hist.sum()."""
    return TopWalk(hist.numpy()).bin(k)


@dataclass
class Threshold:
    """Result of a selection: keep key > ``key``, plus ``ties`` elements with key == ``key`` (lowest index first).

    ``key = -1`` keeps everything (k >= n); ``key = 2**31 - 1`` with ties 0 keeps nothing (k = 0): both stay
    expressible with the same comparison.
    """

    key: int
    ties: int
    keep_all_ties: bool = False


@dataclass
class TopKSelector:
    """Exact k-th largest key for ``len(ks)`` independent selections, accumulated over chunks.

    Each selection ``i`` looks at row ``src[i]`` of the stacked keys handed to ``add_hi``/``add_lo`` (so several
    selections may share one model's keys, e.g. breadcrumbs' two cut-offs).
    """

    ks: list[int]
    n: int  # elements per selection
    src: list[int] = field(default_factory=list)
    keep_all_ties: bool = False

    def __post_init__(self):
        if not self.src:
            self.src = list(range(len(self.ks)))
        self.hist_hi = torch.zeros(len(self.ks), BINS, dtype=torch.int64)
        self.hist_lo = torch.zeros(len(self.ks), BINS, dtype=torch.int64)
        self.bin_hi: list[int | None] = [None] * len(self.ks)
        self.above_hi: list[int] = [0] * len(self.ks)
        self.result: list[Threshold | None] = [None] * len(self.ks)

    def _trivial(self, i: int) -> Threshold | None:
        k = self.ks[i]
        if k <= 0:
            return Threshold(key=2**31 - 1, ties=0)
        if k >= self.n:
            return Threshold(key=-1, ties=0)
        return None

    def add_hi(self, keys: torch.Tensor) -> None:
        """Accumulate the high-16-bit histograms; ``keys`` is [models, elements_in_chunk] int32."""
        for i, row in enumerate(self.src):
            if self._trivial(i) is None:
                self.hist_hi[i] += torch.bincount(keys[row] >> 16, minlength=BINS)

    def end_hi(self) -> None:
        for i in range(len(self.ks)):
            if self._trivial(i) is None:
                self.bin_hi[i], self.above_hi[i] = _walk_down(self.hist_hi[i], self.ks[i])

    def add_lo(self, keys: torch.Tensor) -> None:
        for i, row in enumerate(self.src):
            if self.bin_hi[i] is None:
                continue
            k = keys[row]
            inside = k[(k >> 16) == self.bin_hi[i]]
            self.hist_lo[i] += torch.bincount(inside & 0xFFFF, minlength=BINS)

    def end_lo(self) -> list[Threshold]:
        for i in range(len(self.ks)):
            trivial = self._trivial(i)
            if trivial is not None:
                self.result[i] = trivial
                continue
            need = self.ks[i] - self.above_hi[i]
            lo, above_lo = _walk_down(self.hist_lo[i], need)
            self.result[i] = Threshold(key=(self.bin_hi[i] << 16) | lo, ties=need - above_lo,
                                       keep_all_ties=self.keep_all_ties)
        return self.result  # type: ignore[return-value]


class TieCursor:
    """Counts threshold ties seen so far while the mask pass walks chunks in flat order."""

    def __init__(self, count: int):
        self.seen = [0] * count

    def mask(self, i: int, keys: torch.Tensor, th: Threshold) -> torch.Tensor:
        """Keep-mask for one selection on one chunk of keys (flat order continues from the previous chunk)."""
        above = keys > th.key
        if th.ties == 0 and not th.keep_all_ties:
            return above
        equal = keys == th.key
        if th.keep_all_ties:
            return above | equal
        # the first (ties - seen) equal elements in flat order are kept; equal elements are few, so index them
        positions = torch.nonzero(equal.reshape(-1)).squeeze(1)
        take = max(0, min(positions.numel(), th.ties - self.seen[i]))
        self.seen[i] += positions.numel()
        keep = above.reshape(-1).clone()
        keep[positions[:take]] = True
        return keep.reshape(above.shape)


def topk_mask(x: torch.Tensor, k: int, *, keep_all_ties: bool = False) -> torch.Tensor:
    """Mask of the k largest |x| (ties at the threshold broken by lowest flat index, or all kept).

    Single-chunk convenience wrapper around ``TopKSelector`` for in-memory tensors.
    """
    keys = magnitude_keys(x).reshape(1, -1)
    sel = TopKSelector([int(k)], keys.shape[1], keep_all_ties=keep_all_ties)
    sel.add_hi(keys)
    sel.end_hi()
    sel.add_lo(keys)
    (th,) = sel.end_lo()
    return TieCursor(1).mask(0, keys[0], th).reshape(x.shape)
