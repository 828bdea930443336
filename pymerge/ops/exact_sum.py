"""Chunking-independent sums: per-row fp64 partial sums, combined with an exactly rounded ``math.fsum``.

A reduction over a tensor streamed in row chunks must give the same bits for any chunk size, or a merge would
depend on the memory budget. Rows are never split across chunks, so each row's fp64 sum is the same whatever
the chunking; ``math.fsum`` of all row sums is exactly rounded, hence independent of their grouping too.
"""

from __future__ import annotations

import math

import torch


class ExactSum:
    """Accumulates row sums of several quantities (``width`` of them) over chunks; ``values()`` at the end."""

    def __init__(self, width: int = 1):
        self.width = width
        self.parts: list[torch.Tensor] = []

    def add_rows(self, rows: torch.Tensor) -> None:
        """``rows``: fp64 per-row sums, shape [rows, width] (or [rows] when width == 1)."""
        self.parts.append(rows.detach().to(torch.float64).reshape(-1, self.width))

    def values(self) -> list[float]:
        if not self.parts:
            return [0.0] * self.width
        allrows = torch.cat(self.parts, dim=0)
        return [math.fsum(allrows[:, j].tolist()) for j in range(self.width)]


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """fp64 sum of each row of a [rows, cols] tensor."""
    return x.to(torch.float64).sum(dim=-1)


LANES = 8  # the native DARE/DELLA L1 kernel's fp64 lanes (csrc/cpu/dare_l1_rows.cpp, kLanes)


def lane_row_sums(x: torch.Tensor) -> torch.Tensor:
    """fp64 sum of each row of a [rows, cols] tensor in one fixed order: ``LANES`` partial sums, lane l adding
    the columns c = l (mod LANES) in increasing order from 0.0, combined as ((s0 + s1) + (s2 + s3)) + ((s4 + s5)
    + (s6 + s7)).

    One order that a compiled kernel reproduces bit for bit with one vector add per eight elements (``torch.sum``
    picks an order of its own): the native DARE/DELLA L1 pass (``native_cpu.dare_l1_rows``) sums the same way,
    so ``rescale`` gives both backends the same bits. The row is padded with zeros to a multiple of LANES
    (+0.0 changes no sum of magnitudes); ``cumsum`` on the CPU accumulates in index order.
    """
    x = x.to(torch.float64)
    cols = x.shape[-1]
    if cols == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.float64, device=x.device)
    pad = -cols % LANES
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    lanes = x.reshape(*x.shape[:-1], -1, LANES).cumsum(dim=-2)[..., -1, :]
    s = [lanes[..., i] for i in range(LANES)]
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))
