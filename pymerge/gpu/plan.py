"""GPU memory plan of one tensor: resident (every pass on one device copy) or chunked (row chunks streamed per
pass through two device buffers), from a byte budget. Pure arithmetic: tested without a GPU.

Device bytes, per element of a row chunk: the stacked inputs in their stored dtype (n_inputs * in_itemsize),
the output chunk (out_itemsize) and the merge's scratch; plus the merge's fixed bytes (histograms, tie scan).
A resident tensor needs one input stack and one output buffer; a chunked one two of each, so the next chunk's
upload and the previous chunk's download overlap the current chunk's kernels (double buffering).
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


def plan_chunks(fp: Footprint, budget: int) -> ChunkPlan:
    """Resident when the whole tensor fits ``budget`` bytes with one buffer of each kind, else the largest row
    chunk that fits with two; MergeError naming the tensor when not even one row fits."""
    if fp.rows <= 0 or fp.row_numel == 0:
        return ChunkPlan(True, max(fp.rows, 0), ((0, fp.rows),) if fp.rows > 0 else (), fp.fixed_bytes)
    whole = fp.fixed_bytes + fp.rows * fp.bytes_per_row(1)
    if whole <= budget:
        return ChunkPlan(True, fp.rows, ((0, fp.rows),), whole)
    per_row = fp.bytes_per_row(2)
    rows = (budget - fp.fixed_bytes) // max(per_row, 1)
    if rows < 1:
        need = fp.fixed_bytes + per_row
        raise MergeError(f"tensor '{fp.name}': one row needs {need / 2**20:.1f} MiB of GPU memory (two buffers of "
                         f"{fp.n_inputs} inputs and the output, plus scratch), more than --max-gpu-memory "
                         f"{budget / 2**20:.1f} MiB")
    rows = int(min(rows, fp.rows))
    chunks = tuple((a, min(a + rows, fp.rows)) for a in range(0, fp.rows, rows))
    return ChunkPlan(False, rows, chunks, fp.fixed_bytes + rows * per_row)


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
