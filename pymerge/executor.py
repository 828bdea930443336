"""Runs a plan: chunks, passes, the host-memory budget, progress, and the offset writer.

The executor never knows a method's math. Per output tensor it picks the largest row chunk whose working set
fits the budget, drives the method's passes over those chunks (see methods/base.py), casts each output chunk
once (round-to-nearest-even) and writes it at its offset in the pre-laid-out shard. A tensor that fits is
read once into a resident fp32 stack and every pass runs on it; one that does not is re-read from the
memory map for each pass, chunk by chunk, so memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .errors import MergeError
from .io.prefetch import Prefetcher
from .io.write_behind import WriteBehind
from .io.safetensors_writer import ShardedWriter
from .methods import Chunk, TensorJob
from .ops.threads import threads_for
from .plan import Plan, PlannedTensor

log = logging.getLogger("pymerge")

FP32 = 4


@dataclass
class ExecStats:
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    chunked_tensors: int = 0  # tensors that did not fit the budget and were streamed in chunks


def bytes_per_row(job: TensorJob, scratch_factor: float, out_itemsize: int) -> int:
    """Working-set bytes of one row: the fp32 input stack, the method's scratch, the fp32 result row and two
    output rows (the one being cast and the previous chunk's, still being written behind)."""
    n_in = len(job.inputs)
    return int(job.row_numel * (n_in * FP32 * (1 + scratch_factor) + FP32 + 2 * out_itemsize))


def chunk_rows(job: TensorJob, scratch_factor: float, out_itemsize: int, budget: int) -> int:
    """Rows per chunk so that one chunk's working set stays within ``budget`` bytes."""
    per_row = bytes_per_row(job, scratch_factor, out_itemsize)
    rows = budget // max(per_row, 1)
    if rows < 1:
        raise MergeError(f"tensor '{job.name}': one row needs {per_row / 2**20:.1f} MiB of working memory, more "
                         f"than the budget of {budget / 2**20:.1f} MiB; raise --max-memory")
    return int(min(rows, job.rows))


def _view_rows(t: torch.Tensor, job: TensorJob, start: int, stop: int) -> torch.Tensor:
    return t.reshape(job.rows, job.row_numel)[start:stop]


def input_rows(plan: Plan, pt: PlannedTensor, start: int, stop: int) -> list[torch.Tensor]:
    """Rows [start, stop) of every input of ``pt`` as [rows, row_numel] tensors in their stored dtype.

    Through ``Checkpoint.rows``: zero-copy views of the memory maps for safetensors, and only those rows computed
    for inputs that are computed (LoRA adapters), so a chunk never materializes a whole input tensor.
    """
    job = pt.job
    out = []
    for m, name in pt.sources:
        ck = plan.checkpoints[m]
        t = ck.rows(name, start, stop) if len(pt.shape) >= 2 else ck.tensor(name)  # a vector is one job row
        out.append(t.reshape(stop - start, job.row_numel))
    return out


class _Loader:
    """Reads row ranges of every input of one tensor into a reusable fp32 stack.

    With ``check_finite`` set, each loaded chunk is checked for NaN/Inf and a ``MergeError`` names the tensor,
    the models holding non-finite values and how many. The caller clears the flag once every row has been
    checked, so re-reads by later passes cost nothing extra.
    """

    def __init__(self, plan: Plan, pt: PlannedTensor, stats: ExecStats, *, check_finite: bool = False):
        self.plan, self.pt, self.stats = plan, pt, stats
        self.job = pt.job
        self.check_finite = check_finite

    @property
    def views(self) -> list[torch.Tensor]:
        """Every input tensor whole (only the non-finite error report needs them)."""
        return [self.plan.checkpoints[m].tensor(name) for m, name in self.pt.sources]

    def load(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        n = stop - start
        if out is None or out.shape[1] != n:
            out = torch.empty(len(self.pt.sources), n, self.job.row_numel, dtype=torch.float32)
        for i, src in enumerate(input_rows(self.plan, self.pt, start, stop)):
            out[i].copy_(src)  # widening copy: bf16/f16 -> f32 is exact
            self.stats.bytes_read += src.numel() * src.element_size()
        if self.check_finite and not bool(out.sum().isfinite()):
            # The sum is non-finite iff some element is NaN/Inf, or finite values overflowed fp32; it is one
            # streaming read (torch.isfinite(...).all() measured ~25x slower, it builds three temporaries).
            # Only on this rare path do we look element by element.
            self._raise_if_nonfinite(out)
        return out

    def _raise_if_nonfinite(self, stack: torch.Tensor) -> None:
        """MergeError listing every input whose whole tensor holds NaN/Inf (after the fp32 widening)."""
        if all(bool(torch.isfinite(stack[i]).all()) for i in range(stack.shape[0])):
            return  # a finite sum that overflowed, not a bad input
        raise_nonfinite(self.pt, self.views, max(stack.shape[1], 1))


def raise_nonfinite(pt: PlannedTensor, views: list[torch.Tensor], step: int) -> None:
    """MergeError naming every input of ``pt`` that holds NaN/Inf, with the counts (read ``step`` rows at a time);
    returns when none does."""
    job = pt.job
    found = []
    for (model, name), v in zip(pt.sources, views):
        nan, inf = _count_nonfinite(v, job, step)
        if nan or inf:
            what = " and ".join(f"{c} {k}" for c, k in ((nan, "NaN"), (inf, "Inf")) if c)
            found.append(f"model '{model}' (input tensor '{name}': {what} of {job.numel})")
    if not found:
        return  # finite inputs whose fp32 arithmetic overflowed: not a bad input
    raise MergeError(f"tensor '{job.name}': non-finite values in {', '.join(found)}; "
                     "pass allow_nonfinite=True (--allow-nonfinite) to merge them anyway")


def _count_nonfinite(view: torch.Tensor, job: TensorJob, step: int) -> tuple[int, int]:
    """(NaN count, Inf count) of one input tensor after widening to fp32, read ``step`` rows at a time."""
    nan = inf = 0
    for a in range(0, job.rows, step):
        rows = _view_rows(view, job, a, min(a + step, job.rows)).float()
        nan += int(rows.isnan().sum())
        inf += int(rows.isinf().sum())
    return nan, inf


def _chunks(rows: int, step: int) -> list[tuple[int, int]]:
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def run_global_passes(plan: Plan, budget: int, stats: ExecStats, *, check_finite: bool = False) -> bool:
    """Whole-model statistics (e.g. ties with trim_scope: global): reduce passes over every tensor first.

    Returns whether a pass read every input weight (the first one checks them for NaN/Inf when
    ``check_finite``); passes of a method that reads only ``job.aux`` statistics read none.
    """
    method = plan.method
    jobs = [pt.job for pt in plan.tensors]
    passes = method.global_passes(jobs[0].params)
    if not passes:
        if method.global_state_without_passes(jobs[0].params):
            state = method.global_init(jobs)
            for job in jobs:
                job.global_state = state
        return False
    state = method.global_init(jobs)
    result = None
    for p in range(passes):
        for pt in plan.tensors:
            loader = _Loader(plan, pt, stats, check_finite=check_finite and p == 0)
            step = chunk_rows(pt.job, method.scratch_factor, FP32, budget)
            with threads_for(pt.job.numel * len(pt.job.inputs)):  # small tensors: one thread (ops/threads.py)
                for a, b in _chunks(pt.job.rows, step):
                    data = loader.load(a, b) if method.global_reads_weights else None
                    method.global_reduce(state, p, pt.job, Chunk(a, b, data))
        result = method.global_end_pass(state, p)
    for job in jobs:
        job.global_state = result
    return method.global_reads_weights  # whether the first pass saw (and checked) every input weight


def _prepare_job(plan: Plan, pt: PlannedTensor, writer_fn: Callable[[torch.Tensor, int], None]) -> bool:
    """Fill the job's backend and dtypes for ``Method.start``; an empty tensor is written here (returns False)."""
    job = pt.job
    if job.numel == 0:
        writer_fn(torch.empty((0,) if len(pt.shape) < 2 else (job.rows, *pt.shape[1:]), dtype=pt.out_dtype), 0)
        return False
    job.backend, job.backend_explicit = plan.backend, plan.backend_explicit
    job.in_dtypes = tuple(plan.checkpoints[m].info(n).torch_dtype for m, n in pt.sources)
    job.out_dtype = pt.out_dtype
    return True


def merge_tensor(plan: Plan, pt: PlannedTensor, writer_fn: Callable[[torch.Tensor, int], None], budget: int,
                 stats: ExecStats, *, check_finite: bool = False) -> None:
    """Drive one tensor's passes over its chunks and hand each cast output chunk to ``writer_fn``.

    With ``check_finite``, the first read of every chunk is checked for NaN/Inf (MergeError), re-reads are not.
    """
    job = pt.job
    method = plan.method
    if not _prepare_job(plan, pt, writer_fn):
        return
    merge = method.start(job)
    itemsize = torch.empty(0, dtype=pt.out_dtype).element_size()
    if merge.raw_inputs:
        _merge_raw(plan, pt, merge, writer_fn, budget, stats, itemsize, check_finite=check_finite)
        return
    step = chunk_rows(job, method.scratch_factor, itemsize, budget)
    chunks = _chunks(job.rows, step)
    loader = _Loader(plan, pt, stats, check_finite=check_finite)
    resident = len(chunks) == 1
    if not resident:
        stats.chunked_tensors += 1
        log.debug("tensor %s: %d chunks of %d rows", job.name, len(chunks), step)
    # A resident tensor is read once here; a streamed one is read by each traversal below.
    buf = loader.load(*chunks[0]) if resident else None

    def each_chunk() -> Iterator[Chunk]:
        nonlocal buf
        for a, b in chunks:
            if not resident:
                buf = loader.load(a, b, buf)
            yield Chunk(a, b, buf)
        loader.check_finite = False  # every row has now been checked once; later passes re-read the same bytes

    for p in range(merge.reduce_passes):
        for chunk in each_chunk():
            merge.reduce(p, chunk)
        merge.end_pass(p)
    for chunk in each_chunk():
        out = merge.map(chunk).to(pt.out_dtype)  # the single narrowing cast, round-to-nearest-even
        if buf is not None and out.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
            out = out.clone()  # a view of the reused input buffer: the write behind must not see it change
        writer_fn(out, chunk.row_start)
        stats.bytes_written += out.numel() * itemsize


def merge_tensor_gpu(plan: Plan, pt: PlannedTensor, writer_fn: Callable[[torch.Tensor, int], None], gpu: tuple,
                     stats: ExecStats, *, check_finite: bool = False) -> None:
    """One tensor on the streaming GPU executor ``gpu = (engine, kernels)``; the NaN/Inf policy is checked on
    the host copies first (a read the staging copies then find in the page cache)."""
    from .gpu.streaming import merge_planned_tensor

    job = pt.job
    if not _prepare_job(plan, pt, writer_fn):
        return
    views = [plan.checkpoints[m].tensor(n) for m, n in pt.sources]
    if check_finite and _any_nonfinite(views):
        raise_nonfinite(pt, views, job.rows)
    engine, kernels = gpu
    before = engine.stats.chunked_tensors
    merge_planned_tensor(plan, pt, writer_fn, engine, kernels)
    stats.chunked_tensors += engine.stats.chunked_tensors - before
    stats.bytes_read += sum(v.numel() * v.element_size() for v in views)
    stats.bytes_written += job.numel * torch.empty(0, dtype=pt.out_dtype).element_size()


def _any_nonfinite(views: list[torch.Tensor]) -> bool:
    """Whether any input holds a NaN or Inf: the native count (SIMD on the stored bits) where it is built;
    ``torch.isfinite`` took 0.49 s of a 1.68 s GPU merge of the demo family (H100 host, 2026-11-23)."""
    from ._native import cpu_module

    native = cpu_module() is not None
    for v in views:
        if v.numel() == 0:
            continue
        if native and v.is_contiguous() and v.dtype in (torch.float32, torch.float16, torch.bfloat16):
            from .ops.native_cpu import count_nonfinite

            if count_nonfinite([v.reshape(-1)])[0]:
                return True
        elif not bool(torch.isfinite(v).all()):
            return True
    return False


def _merge_raw(plan: Plan, pt: PlannedTensor, merge, writer_fn: Callable[[torch.Tensor, int], None], budget: int,
               stats: ExecStats, itemsize: int, *, check_finite: bool) -> None:
    """Drive a ``raw_inputs`` merge: chunks are row views of the memory maps in their stored dtype, re-read by
    every pass (from the page cache), so only the output chunk counts against the budget."""
    from .ops.native_cpu import count_nonfinite

    job = pt.job
    # this chunk's output and the previous one, still being written; plus the merge's own temporaries
    per_row = int(job.row_numel * (itemsize * 2 + merge.raw_scratch_per_element))
    step = min(job.rows, budget // max(per_row, 1))
    if step < 1:
        raise MergeError(f"tensor '{job.name}': one output row needs {per_row:,} bytes (its output twice, one "
                         f"being written behind, and the merge's scratch), more than the budget of {budget:,} "
                         "bytes; raise --max-memory")
    chunks = _chunks(job.rows, step)
    if len(chunks) > 1:
        stats.chunked_tensors += 1
    first = True
    # A merge whose first reduce pass sees every input element reports NaN/Inf from its own statistics,
    # which saves the separate scan (a tenth of a native TIES merge).
    scan = check_finite and not merge.finds_nonfinite
    if check_finite and merge.finds_nonfinite:
        merge.nonfinite_found = lambda: raise_nonfinite(
            pt, [plan.checkpoints[m].tensor(n) for m, n in pt.sources], step)

    def each_chunk() -> Iterator[Chunk]:
        nonlocal first
        for a, b in chunks:
            raw = input_rows(plan, pt, a, b)
            if first:
                stats.bytes_read += sum(r.numel() * r.element_size() for r in raw)
                if scan and any(count_nonfinite(raw)):
                    raise_nonfinite(pt, [plan.checkpoints[m].tensor(n) for m, n in pt.sources], step)
            yield Chunk(a, b, None, raw)
        first = False

    for p in range(merge.reduce_passes):
        for chunk in each_chunk():
            merge.reduce(p, chunk)
        merge.end_pass(p)
    for chunk in each_chunk():
        out = merge.map(chunk)
        writer_fn(out, chunk.row_start)
        stats.bytes_written += out.numel() * itemsize


def execute(plan: Plan, writer: ShardedWriter, *, max_memory: int, progress: bool = True,
            allow_nonfinite: bool = False, skip: set[str] | frozenset[str] = frozenset(),
            on_tensor_done: Callable[[str], None] | None = None, gpu: tuple | None = None) -> ExecStats:
    """Merge every planned tensor into ``writer`` within ``max_memory`` bytes of working memory.

    Unless ``allow_nonfinite``, a NaN/Inf in any input is a MergeError (raised on the first read of its chunk).
    Tensors named in ``skip`` (already written by an interrupted run being resumed) are not merged; whole-model
    passes still read them. ``on_tensor_done(name)`` is called once a merged tensor's last row is written.
    ``stats.tensors`` counts the tensors merged by this call. ``gpu = (engine, kernels)`` merges every tensor
    with the streaming GPU executor (``pymerge.gpu.streaming``) instead, within the engine's device budget.
    """
    stats = ExecStats()
    t0 = time.perf_counter()
    checked = run_global_passes(plan, max_memory, stats, check_finite=not allow_nonfinite)

    def input_bytes(pt: PlannedTensor) -> int:
        return sum(plan.checkpoints[m].info(n).nbytes for m, n in pt.sources)

    resumed = sum(1 for pt in plan.tensors if pt.name in skip)
    note = f" ({resumed} resumed)" if resumed else ""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.input_bytes, initial=sum(input_bytes(pt) for pt in plan.tensors if pt.name in skip),
                   unit="B", unit_scale=True, unit_divisor=1024, desc="merging", dynamic_ncols=True, leave=False)
        if resumed:
            bar.set_postfix_str(f"{resumed}/{len(plan.tensors)} tensors{note}")
    todo = [pt for pt in plan.tensors if pt.name not in skip]
    prefetcher = Prefetcher()  # maps the next tensor's input pages while this one is merged (io/prefetch.py)

    def prefetch(i: int) -> None:
        if i < len(todo):
            cks = plan.checkpoints  # computed inputs (LoRA adapters) have no file range to prefetch
            prefetcher.submit(cks[m].byte_range(n) for m, n in todo[i].sources if hasattr(cks[m], "byte_range"))

    prefetch(0)
    # Output chunks are written on a background thread while the next one is merged (io/write_behind.py);
    # on_tensor_done runs there too, after the tensor's last chunk.
    behind = WriteBehind(lambda name, data, row: writer.write(name, data, row_start=row), on_tensor_done)
    try:
        done = 0  # input bytes of the tensors merged here (re-reads of chunked passes not counted twice)
        for i, pt in enumerate(todo):
            prefetch(i + 1)

            def write(out: torch.Tensor, row_start: int, pt=pt) -> None:
                shape = pt.shape if len(pt.shape) < 2 else (out.shape[0], *pt.shape[1:])
                data = out.reshape(shape).contiguous()
                row = row_start if len(pt.shape) >= 2 else 0
                if gpu is not None:
                    # The GPU engine's host chunks live in its staging slots, reused at once: a copy (at most one
                    # 64 MiB slot) goes to the write-behind, so the disk write overlaps the next chunk. Writing
                    # in place cost 0.21 s of a 1.68 s GPU merge of the demo family (H100 host, 2026-11-23).
                    data = data.clone()
                behind.write(pt.name, data, row)

            with threads_for(pt.job.numel * len(pt.job.inputs)):
                if gpu is not None:
                    merge_tensor_gpu(plan, pt, write, gpu, stats, check_finite=not (allow_nonfinite or checked))
                else:
                    merge_tensor(plan, pt, write, max_memory, stats, check_finite=not (allow_nonfinite or checked))
            behind.done(pt.name)
            stats.tensors += 1
            if bar is not None:
                size = input_bytes(pt)
                done += size
                bar.update(size)
                elapsed = max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{resumed + stats.tensors}/{len(plan.tensors)} tensors{note}, "
                                    f"{done / elapsed / 1e9:.2f} GB/s")
        behind.close()  # every chunk written and journaled before the stats say so
    except BaseException:
        behind.close(raise_errors=False)  # on errors and Ctrl-C too: what was handed over is written
        raise
    finally:
        prefetcher.close()
        if bar is not None:
            bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats
