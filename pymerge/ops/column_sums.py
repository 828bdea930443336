"""Column sums over row chunks, bit-identical whatever the chunking.

    total[j] = sum_i x[i, j]        over every row i of a tensor that arrives in row chunks, in row order

Float addition is not associative, so summing each chunk and adding the chunk sums would give different bits for
different chunk sizes (and a merge would depend on the memory budget). Here rows are grouped in fixed blocks of
``BLOCK`` rows counted from row 0: each block is reduced by one ``sum(dim=0)`` of a [BLOCK, width] tensor (its
order depends on that shape only), and block sums are added in row order. A block split between two chunks
waits, at most ``BLOCK - 1`` rows of it, until its last row arrives.
"""

from __future__ import annotations

import torch

BLOCK = 64


class ColumnSums:
    """Accumulates ``add(row_start, x[rows, width])`` chunks (in row order, float64) into ``total()``."""

    def __init__(self, width: int, dtype: torch.dtype = torch.float64):
        self.width = width
        self.acc = torch.zeros(width, dtype=dtype)
        self.pending: torch.Tensor | None = None  # rows of the current, incomplete block
        self.next_row = 0

    def add(self, row_start: int, x: torch.Tensor) -> None:
        if row_start != self.next_row:
            raise ValueError(f"column sums: chunk starts at row {row_start}, expected {self.next_row}")
        self.next_row += x.shape[0]
        if self.pending is not None:
            x = torch.cat([self.pending, x], dim=0)
            self.pending = None
        full = x.shape[0] // BLOCK * BLOCK
        for a in range(0, full, BLOCK):
            self.acc += x[a:a + BLOCK].contiguous().sum(dim=0)
        if full < x.shape[0]:
            self.pending = x[full:].clone()

    def total(self) -> torch.Tensor:
        """The column sums of every row added so far (the last, partial block included)."""
        acc = self.acc.clone()
        if self.pending is not None:
            acc += self.pending.contiguous().sum(dim=0)
        return acc
