"""Exact order statistics (the value at given ascending positions) of fp32 streams seen in row chunks.

    value(s, i) = sorted(x_s)[i]       (ascending, 0-based), for each stream s and each requested i

Position 0 is the minimum and n-1 the maximum (tracked directly); interior positions are the (n - i)-th
largest key, found exactly by the two-pass 16+16-bit radix histograms of ``select.py`` (same walk-down). Keys are
either the magnitude bits of |x| (``signed=False``) or an order-preserving 32-bit key of signed x
(``signed=True``), so the result is exact whatever the chunking: histogram counts, minima and maxima do not
depend on the order the chunks come in.

PCB needs this for its clipping quantiles of |tau| and its balanced-score quantile; NeuroMerging-style
"keep >= k-th smallest" trims use ``TopKSelector`` directly.
"""

from __future__ import annotations

import struct

import torch

from .select import BINS, _walk_down, magnitude_keys

_SIGN = 1 << 31


def signed_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) monotone in fp32 ``x`` (-0.0 sorts just below +0.0; both are the value 0)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    mag = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, bits + _SIGN, (_SIGN - 1) - mag)


def key_value(key: int, signed: bool) -> float:
    """The fp32 value (as a Python float) whose key is ``key``."""
    if not signed:
        return struct.unpack("<f", struct.pack("<i", key))[0]
    if key >= _SIGN:
        return struct.unpack("<f", struct.pack("<i", key - _SIGN))[0]
    return -struct.unpack("<f", struct.pack("<i", (_SIGN - 1) - key))[0]


class OrderStatistics:
    """Values at ascending positions ``positions[s]`` of streams s = 0..S-1, each of ``n`` elements.

    Feed every chunk ``x[S, m]`` (fp32, the streams side by side) to ``add(0, x)``, call ``end(0)``, feed the same
    chunks (any chunking) to ``add(1, x)``, call ``end(1)``; then ``values[s][j]`` is the value at
    ``positions[s][j]``. ``signed=False`` orders |x|.

    Bin indices are buffered and counted by one ``bincount`` per ~256 Ki elements rather than per chunk: counts
    do not depend on grouping, and a 65,536-bin histogram per small chunk would cost far more than the data.
    """

    FLUSH = 1 << 18

    def __init__(self, n: int, positions: list[list[int]], *, signed: bool):
        if n < 1:
            raise ValueError("order statistics of an empty stream")
        for pos in positions:
            for i in pos:
                if not 0 <= i < n:
                    raise ValueError(f"position {i} outside [0, {n})")
        self.n, self.positions, self.signed = n, positions, signed
        self.lo = [float("inf")] * len(positions)
        self.hi = [float("-inf")] * len(positions)
        # interior positions -> one selection each: the (n - i)-th largest key of its stream
        self.slots = [(s, i) for s, pos in enumerate(positions) for i in pos if 0 < i < n - 1]
        self.streams = sorted({s for s, _ in self.slots})
        self.hist = torch.zeros(len(self.streams) if self.slots else 0, BINS, dtype=torch.int64)
        self.bins: list[tuple[int, int]] = []  # per slot: (high-16-bit bin, count of keys above that bin)
        self._pending: list[torch.Tensor] = []
        self._pending_n = 0
        self.values: list[list[float]] | None = None

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return signed_keys(x) if self.signed else magnitude_keys(x)

    def _push(self, idx: torch.Tensor) -> None:
        self._pending.append(idx.reshape(-1).to(torch.int64))
        self._pending_n += idx.numel()
        if self._pending_n >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            counts = torch.bincount(torch.cat(self._pending), minlength=self.hist.numel())
            self.hist.view(-1).add_(counts)
        self._pending, self._pending_n = [], 0

    def add(self, p: int, x: torch.Tensor) -> None:
        x = x.reshape(len(self.positions), -1)
        if x.shape[1] == 0:
            return
        if p == 0:
            v = x if self.signed else x.abs()
            for s in range(len(self.positions)):
                self.lo[s] = min(self.lo[s], float(v[s].min()))
                self.hi[s] = max(self.hi[s], float(v[s].max()))
        if not self.slots:
            return
        keys = self._keys(x[self.streams])
        if p == 0:
            offsets = torch.arange(len(self.streams), dtype=torch.int64).unsqueeze(1) * BINS
            self._push((keys >> 16) + offsets)
            return
        for j, (s, _) in enumerate(self.slots):
            k = keys[self.streams.index(s)]
            inside = k[(k >> 16) == self.bins[j][0]]
            self._push((inside & 0xFFFF) + j * BINS)

    def end(self, p: int) -> None:
        self._flush()
        if p == 0:
            if self.slots:
                self.bins = [_walk_down(self.hist[self.streams.index(s)], self.n - i) for s, i in self.slots]
                self.hist = torch.zeros(len(self.slots), BINS, dtype=torch.int64)  # pass 1: low bits per slot
            return
        found = {}
        for j, (s, i) in enumerate(self.slots):
            b, above = self.bins[j]
            lo, _ = _walk_down(self.hist[j], (self.n - i) - above)
            found[(s, i)] = key_value((b << 16) | lo, self.signed)
        self.values = [[self.lo[s] if i == 0 else self.hi[s] if i == self.n - 1 else found[(s, i)] for i in pos]
                       for s, pos in enumerate(self.positions)]
