"""GPU memory plan of one tensor: resident (every pass on one device copy) or chunked (row chunks streamed per
pass through two device buffers), from a byte budget. Pure arithmetic: tested without a GPU.

Device bytes, per element of a row chunk: the stacked inputs in their stored dtype (n_inputs * in_itemsize),
the output chunk (out_itemsize) and the merge's scratch; plus the merge's fixed bytes (histograms, tie scan).
A resident tensor needs one input stack and one output buffer; a chunked one two of each, so the next chunk's
upload and the previous chunk's download overlap the current chunk's kernels (double buffering).

Each allocation over 1 MiB is counted 1 MiB larger: torch's CUDA caching allocator hands out a cached block
or a 2 MiB-rounded segment whole when what would remain is at most 1 MiB, and counts the whole block as
allocated (a 2 GiB budget was exceeded by exactly 1 MiB on an H100 without this, 2026-11-23). Below 1 MiB,
blocks are 512-byte multiples: at most 511 bytes per allocation beyond ``device_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MergeError


@dataclass(frozen=True)
class Footprint:
    """What one tensor's merge needs on the device."""

    name: str
    rows: int
    row_numel: int
    n_inputs: int
    in_itemsize: int
    out_itemsize: int
    scratch_per_element: float = 0.0  # bytes of kernel scratch per element of a chunk (all experts together)
    fixed_bytes: int = 0  # bytes independent of the chunk size (histograms, tie-scan scratch)

    def bytes_per_row(self, buffers: int) -> int:
        stack = self.n_inputs * self.in_itemsize
        return int(self.row_numel * (buffers * (stack + self.out_itemsize) + self.scratch_per_element))

    def device_bytes(self, rows: int, buffers: int, slack: bool = True) -> int:
        """Device bytes of ``rows``-row chunks with ``buffers`` of each kind; ``slack``: with the CUDA caching
        allocator's (module docstring)."""
        elems = rows * self.row_numel
        stack = _charged(elems * self.n_inputs * self.in_itemsize, slack)
        out = _charged(elems * self.out_itemsize, slack)
        scratch = int(elems * self.scratch_per_element)
        extra = SCRATCH_ALLOCATIONS * LARGE_ALLOCATION if slack and scratch > LARGE_ALLOCATION else 0
        return _charged(self.fixed_bytes, slack) + buffers * (stack + out) + scratch + extra


LARGE_ALLOCATION = 1 << 20  # above this, an allocation may hold up to 1 MiB more (module docstring)
SCRATCH_ALLOCATIONS = 4  # the kernels' per-chunk temporaries come in at most this many allocations (fused.py)


def _charged(nbytes: int, slack: bool) -> int:
    return nbytes + (LARGE_ALLOCATION if slack and nbytes > LARGE_ALLOCATION else 0)


@dataclass(frozen=True)
class ChunkPlan:
    """Row chunks of one tensor and the device bytes they need (``device_bytes`` <= the budget)."""

    resident: bool
    rows_per_chunk: int
    chunks: tuple[tuple[int, int], ...]
    device_bytes: int

    @property
    def buffers(self) -> int:
        return 1 if self.resident else 2


def plan_chunks(fp: Footprint, budget: int, *, allocator_slack: bool = True) -> ChunkPlan:
    """Resident when the whole tensor fits ``budget`` bytes with one buffer of each kind, else the largest row
    chunk that fits with two; MergeError naming the tensor when not even one row fits. ``allocator_slack``:
    count the CUDA caching allocator's rounding (off for the executor's CPU "device", in the tests)."""
    if fp.rows <= 0 or fp.row_numel == 0:
        return ChunkPlan(True, max(fp.rows, 0), ((0, fp.rows),) if fp.rows > 0 else (), fp.fixed_bytes)
    whole = fp.device_bytes(fp.rows, 1, allocator_slack)
    if whole <= budget:
        return ChunkPlan(True, fp.rows, ((0, fp.rows),), whole)
    per_row = max(fp.bytes_per_row(2), 1)
    # The largest row count that fits: device_bytes grows with rows, in steps where a buffer passes 1 MiB, so
    # a binary search under the bound without the slack.
    lo, hi = 0, max(min((budget - fp.fixed_bytes) // per_row, fp.rows), 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fp.device_bytes(mid, 2, allocator_slack) <= budget:
            lo = mid
        else:
            hi = mid - 1
    rows = lo
    if rows < 1:
        need = fp.device_bytes(1, 2, allocator_slack)
        raise MergeError(f"tensor '{fp.name}': one row needs {need / 2**20:.1f} MiB of GPU memory (two buffers of "
                         f"{fp.n_inputs} inputs and the output, plus scratch), more than --max-gpu-memory "
                         f"{budget / 2**20:.1f} MiB")
    rows = int(rows)
    chunks = tuple((a, min(a + rows, fp.rows)) for a in range(0, fp.rows, rows))
    return ChunkPlan(False, rows, chunks, fp.device_bytes(rows, 2, allocator_slack))


@dataclass(frozen=True)
class Step:
    """One unit of work: pass ``p`` (``reduce_passes`` means the map pass) over rows [a, b); ``load`` says whether
    the rows must be uploaded first (always when chunked; only before the first pass when resident)."""

    p: int
    a: int
    b: int
    load: bool

    def is_map(self, reduce_passes: int) -> bool:
        return self.p == reduce_passes


def schedule(plan: ChunkPlan, reduce_passes: int) -> list[Step]:
    """Every pass over the chunks in row order (the map pass last): the order the tie budgets and the Philox
    offsets of the merges rely on. A resident tensor is uploaded once, before its first pass."""
    steps = []
    for p in range(reduce_passes + 1):
        for i, (a, b) in enumerate(plan.chunks):
            steps.append(Step(p, a, b, load=not plan.resident or (p == 0 and i == 0)))
    return steps


def staging_rows(row_bytes: int, staging_bytes: int, rows: int) -> int:
    """Rows per pinned staging copy: as many as fit ``staging_bytes`` (at least one), at most ``rows``."""
    return max(1, min(rows, staging_bytes // max(row_bytes, 1)))
