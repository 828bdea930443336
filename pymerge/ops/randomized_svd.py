"""Randomized truncated SVD (Halko, Martinsson, Tropp 2011) over a matrix streamed in row blocks.

    A ~= U diag(S) Vh,   U [m, rank], S [rank], Vh [rank, n]

    l = min(rank + oversample, min(m, n));  Omega ~ N(0, 1) [n, l] from a seeded torch.Generator
    Y = A Omega,  Q = orth(Y)                                  (1 pass over A)
    repeat power_iters times:  Z = orth(A^T Q),  Q = orth(A Z) (2 passes each)
    B = Q^T A  (accumulated as A^T Q)                          (1 pass)
    B = U_b S Vh (dense, float64),  U = Q U_b[:, :rank]

Each product that needs A is one streamed pass over its row blocks, so A is never materialized: the state is
Omega/Z [n, l] and Y/Q [m, l], i.e. O((m + n) * l) memory. Products with A, the sketches and their
orthonormalization (Householder QR) run in float32, A's precision (task vectors are fp32 differences), as
torch.svd_lowrank does; the small SVD of B runs in float64 ("float64 core": through the Gram matrix when
well conditioned, ``core_svd``); U = Q U_b and the returned factors are float32.

Determinism: the result is a function of (A, rank, oversample, power_iters, seed) only. Incoming row blocks of
any size are re-cut into fixed canonical blocks of ``CANONICAL_ROWS`` rows before any arithmetic, and the fp64
accumulation of A^T Q runs over those blocks in row order, so every block size (and the resident tensor) gives
bit-identical factors on a given device.

Two ways to drive it: ``randomized_svd`` pulls blocks from a ``RowBlockSource``; ``StreamedSVD`` is pushed rows
pass by pass (what a merge method's reduce passes do) and is what ``randomized_svd`` runs on.
"""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import torch

from ..errors import ConfigError, MergeError
from .threads import threads_for

CANONICAL_ROWS = 256  # rows per internal block: fixed, so results do not depend on how rows arrive
DEFAULT_BLOCK_ROWS = 1024  # rows per block pulled from a source when the caller does not say


@runtime_checkable
class RowBlockSource(Protocol):
    """A matrix that can be read in row blocks: ``shape`` (m, n) and ``blocks(rows)`` yielding, in row order,
    ``(row_start, fp32 tensor [rows, n])`` that together cover rows 0..m-1 exactly once."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]: ...


def _check_2d(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ConfigError(f"randomized_svd: {what} must be a 2-D tensor, got {shape}")


class TensorRowBlocks:
    """Row blocks of a 2-D tensor (any float dtype, any device), widened to fp32 block by block."""

    def __init__(self, tensor: torch.Tensor):
        _check_2d(tensor, "tensor")
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tensor.shape)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        m = self.tensor.shape[0]
        for a in range(0, m, block_rows):
            yield a, self.tensor[a:a + block_rows].to(torch.float32)


class DifferenceRowBlocks:
    """Row blocks of ``expert - base`` (a task vector), formed in fp32 one block at a time so the difference is
    never materialized. Both tensors may be memory-mapped views."""

    def __init__(self, expert: torch.Tensor, base: torch.Tensor):
        _check_2d(expert, "expert")
        _check_2d(base, "base")
        if expert.shape != base.shape:
            raise ConfigError(f"randomized_svd: expert shape {list(expert.shape)} differs from base shape "
                              f"{list(base.shape)}")
        self.expert, self.base = expert, base

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.expert.shape)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        m = self.expert.shape[0]
        for a in range(0, m, block_rows):
            e = self.expert[a:a + block_rows].to(torch.float32)
            yield a, e - self.base[a:a + block_rows].to(device=e.device, dtype=torch.float32)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis Q [m, l] of the columns of ``y`` [m, l] (m >= l), in y's dtype: Householder QR.

    Unconditionally stable (Q has orthonormal columns even when y is rank-deficient, spanning range(y) plus
    arbitrary directions). Computed on one thread, so the result does not depend on the thread count. CholeskyQR2 in float64 was tried first and measured ~1.3x slower end to end on
    2048x2048 rank 256 (two fp64 Grams and solves per sketch) for no accuracy the fp32 products could use.
    """
    # One thread: LAPACK's blocked QR rounds differently with another thread count, and the factors must not
    # depend on it (tests/reliability/test_determinism.py). The sketch is small (m x l); the GEMMs with A, which
    # are thread-count invariant, keep every thread.
    with threads_for(0):
        return torch.linalg.qr(y, mode="reduced").Q


# The core's SVD goes through the Gram matrix B B^T when every kept singular value is at least this fraction of
# the largest: squaring the condition number then costs at most (1e4)^2 * 2^-52 ~ 2e-8 relative error in fp64,
# below the fp32 rounding of the returned factors. Measured (266 x n core, top 256, 2 threads): n = 2048 18.6 ms
# against torch.linalg.svd's 55.8 ms in fp64; n = 4096 27.1 ms against 165 ms.
GRAM_MIN_RATIO = 1e-4


def core_svd(b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` SVD (U_b [l, k], S [k], Vh [k, n]) of the float64 core ``b`` [l, n], l <= n.

    Through eigh of the l x l Gram matrix when the kept spectrum is well conditioned (``GRAM_MIN_RATIO``), else
    ``torch.linalg.svd`` (rank-deficient cores keep orthonormal factors that way). The eigensolver runs on one
    thread, so the result does not depend on the thread count.
    """
    gram = b @ b.T
    with threads_for(0):
        evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending
    top = evals[:k].clamp_min(0).sqrt()
    if float(top[0]) > 0 and float(top[-1]) >= GRAM_MIN_RATIO * float(top[0]):
        ub = evecs[:, :k]
        vh = (ub.T @ b) / top[:, None]
        return ub, top, vh
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    return ub[:, :k], s[:k], vh[:k]


class StreamedSVD:
    """Push-driven randomized SVD of an m x n matrix seen only as row blocks.

    Run ``passes`` passes; in each, call ``consume(p, row_start, block)`` with fp32 blocks covering rows 0..m-1
    in order (any block sizes), then ``end_pass(p)``. After the last pass ``result()`` returns (U, S, Vh) in
    float32. Memory: O((m + n) * l) with l = min(rank + oversample, min(m, n)).
    """

    def __init__(self, shape: tuple[int, int], rank: int, *, oversample: int = 10, power_iters: int = 2,
                 seed: int = 0, name: str = "matrix"):
        if len(shape) != 2:
            raise ConfigError(f"randomized_svd: {name} must be 2-D, got shape {list(shape)}")
        m, n = int(shape[0]), int(shape[1])
        r = min(m, n)
        if isinstance(rank, bool) or int(rank) != rank or not 1 <= int(rank) <= r:
            raise ConfigError(f"randomized_svd: rank must be an integer in [1, min(m, n) = {r}] for {name} of "
                              f"shape {m}x{n}, got {rank!r}")
        if int(oversample) < 0 or int(power_iters) < 0:
            raise ConfigError(f"randomized_svd: oversample and power_iters must be >= 0, got {oversample}, "
                              f"{power_iters}")
        self.m, self.n, self.rank, self.name = m, n, int(rank), name
        self.l = min(self.rank + int(oversample), r)
        self.passes = 2 + 2 * int(power_iters)
        gen = torch.Generator().manual_seed(int(seed))
        self._omega = torch.randn(n, self.l, generator=gen, dtype=torch.float32)  # on CPU: same for any device
        self._device: torch.device | None = None
        self._y: torch.Tensor | None = None  # fp32 [m, l]: the sketch A Omega / A Z being built
        self._z: torch.Tensor | None = None  # fp32 [n, l]: A^T Q being accumulated (fixed block order)
        self._right32: torch.Tensor | None = None  # fp32 [n, l] multiplying blocks from the right (Omega or Z)
        self._q32: torch.Tensor | None = None  # fp32 [m, l]: Q, for A^T Q
        self._pending: torch.Tensor | None = None  # rows of an incomplete canonical block
        self._pending_start = 0
        self._next_row = 0
        self._pass = 0
        self._result: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # --- feeding rows ---
    def consume(self, p: int, row_start: int, block: torch.Tensor) -> None:
        """Feed rows [row_start, row_start + block.shape[0]) of A for pass ``p`` (rows must arrive in order)."""
        if p != self._pass or row_start != self._next_row or block.dim() != 2 or block.shape[1] != self.n:
            raise MergeError(f"randomized_svd: {self.name}: pass {p} expected rows from {self._next_row} of width "
                             f"{self.n} (pass {self._pass}), got rows from {row_start} of shape {list(block.shape)}")
        if self._device is None:
            self._start_device(block.device)
        rows = block.shape[0]
        self._next_row += rows
        i = 0
        while i < rows:
            r0 = row_start + i
            if self._pending is None and r0 % CANONICAL_ROWS == 0 and (rows - i >= CANONICAL_ROWS
                                                                      or r0 + rows - i == self.m):
                take = min(CANONICAL_ROWS, rows - i)
                self._block(p, r0, block[i:i + take].to(torch.float32))
                i += take
                continue
            if self._pending is None:
                self._pending_start = r0
                size = min(CANONICAL_ROWS, self.m - r0)
                self._pending = torch.empty(size, self.n, dtype=torch.float32, device=self._device)
                self._filled = 0
            take = min(self._pending.shape[0] - self._filled, rows - i)
            self._pending[self._filled:self._filled + take].copy_(block[i:i + take])
            self._filled += take
            i += take
            if self._filled == self._pending.shape[0]:
                pending, self._pending = self._pending, None
                self._block(p, self._pending_start, pending)

    def _start_device(self, device: torch.device) -> None:
        self._device = device
        self._right32 = self._omega.to(device)
        self._omega = None
        self._y = torch.empty(self.m, self.l, dtype=torch.float32, device=device)  # every row is set

    def _block(self, p: int, r0: int, a: torch.Tensor) -> None:
        """One canonical block of rows [r0, r0 + len(a)): the product this pass needs."""
        r1 = r0 + a.shape[0]
        if p % 2 == 0:  # Y = A Omega  or  Y = A Z, straight into Y's rows
            torch.matmul(a, self._right32, out=self._y[r0:r1])
        else:  # Z += A_blk^T Q_blk, in fixed row order, accumulated by the GEMM itself (no [n, l] temporary)
            self._z.addmm_(a.T, self._q32[r0:r1])

    def end_pass(self, p: int) -> None:
        """Close pass ``p``: orthonormalize the sketch, or (last pass) take the small SVD."""
        if self._next_row != self.m or self._pending is not None:
            raise MergeError(f"randomized_svd: {self.name}: pass {p} saw {self._next_row} of {self.m} rows")
        if p % 2 == 0:
            self._q32 = orthonormalize(self._y)
            self._y = None
            self._z = torch.zeros(self.n, self.l, dtype=torch.float32, device=self._device)
        elif p == self.passes - 1:
            # the small SVD of B = Q^T A = Z^T [l, n] in float64 (the "float64 core")
            ub, s, vh = core_svd(self._z.T.to(torch.float64), self.rank)
            # U = Q U_b in float32: Q holds fp32 columns already, so an fp64 product adds cost, not accuracy
            u = self._q32 @ ub.to(torch.float32)
            self._result = (u, s.to(torch.float32), vh.to(torch.float32))
            self._z = self._q32 = self._right32 = None
        else:
            self._right32 = orthonormalize(self._z)
            self._z = None
            self._y = torch.empty(self.m, self.l, dtype=torch.float32, device=self._device)  # every row is set
        self._pass += 1
        self._next_row = 0

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U [m, rank], S [rank] descending, Vh [rank, n]) in float32, after the last pass."""
        if self._result is None:
            raise MergeError(f"randomized_svd: {self.name}: result() before all {self.passes} passes ran")
        return self._result


def randomized_svd(a: torch.Tensor | RowBlockSource, rank: int, *, oversample: int = 10, power_iters: int = 2,
                   seed: int = 0, block_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD A ~= U diag(S) Vh by the randomized range finder (see module doc).

    ``a``: a 2-D tensor, or a ``RowBlockSource`` (e.g. ``DifferenceRowBlocks(expert, base)``) read in blocks of
    ``block_rows`` rows, 2 + 2 * power_iters passes. Returns float32 U [m, rank], S [rank], Vh [rank, n] on the
    blocks' device; the same bits for any ``block_rows``. ConfigError for rank < 1 or rank > min(m, n).
    """
    source = TensorRowBlocks(a) if isinstance(a, torch.Tensor) else a
    if not (hasattr(source, "shape") and hasattr(source, "blocks")):
        raise ConfigError(f"randomized_svd: expected a 2-D tensor or a RowBlockSource, got {type(a).__name__}")
    m, n = (int(d) for d in source.shape)
    step = int(block_rows) if block_rows is not None else DEFAULT_BLOCK_ROWS
    if step < 1:
        raise ConfigError(f"randomized_svd: block_rows must be >= 1, got {block_rows}")
    svd = StreamedSVD((m, n), rank, oversample=oversample, power_iters=power_iters, seed=seed)
    for p in range(svd.passes):
        for row_start, block in source.blocks(step):
            svd.consume(p, row_start, block)
        svd.end_pass(p)
    return svd.result()


__all__ = ["CANONICAL_ROWS", "core_svd", "RowBlockSource", "TensorRowBlocks", "DifferenceRowBlocks", "StreamedSVD",
           "orthonormalize", "randomized_svd"]
