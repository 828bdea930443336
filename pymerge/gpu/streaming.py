"""The streaming GPU executor: one tensor's passes on the device under a hard memory budget.

Per tensor, ``plan.plan_chunks`` decides resident (uploaded once, every pass on the device copy) or chunked
(row chunks re-streamed for each pass through two device buffers). Data moves only through pinned staging
buffers, filled by the CPU from the memory map: uploads on an H2D stream, kernels on the current stream,
downloads on a D2H stream, ordered by events, so the CPU reads chunk i+1 while the GPU merges chunk i. No managed
memory: every device byte is an explicit torch allocation, sized by the plan.

The same code runs on CPU tensors (``device="cpu"``: no streams, no pinning, events are no-ops), which is how the
planning, the staging splits and the chunk order are tested without a GPU (``trace`` records every step).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..errors import MergeError
from .fused import DeviceChunk, FusedMerge
from .plan import ChunkPlan, Footprint, plan_chunks, staging_rows

DEFAULT_STAGING_BYTES = 64 << 20  # per pinned slot; two slots each way


@dataclass
class GpuStats:
    tensors: int = 0
    chunked_tensors: int = 0
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    trace: list = field(default_factory=list)  # ("upload"|"reduce"|"map"|"download", pass, row_start, row_stop)


class _Lanes:
    """The three CUDA streams and their events; on a CPU device every operation is synchronous and a no-op."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.h2d = torch.cuda.Stream(device)
            self.d2h = torch.cuda.Stream(device)

    def event(self):
        return torch.cuda.Event() if self.cuda else None

    def record(self, event, stream) -> None:
        if event is not None:
            event.record(stream)

    def wait(self, stream, event) -> None:
        if event is not None and stream is not None:
            stream.wait_event(event)

    def host_wait(self, event) -> None:
        if event is not None:
            event.synchronize()

    def on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Staging:
    """Two host slots of ``nbytes`` (pinned on CUDA) used alternately; a slot is refilled only after the copy
    that last read (or wrote) it has finished."""

    def __init__(self, nbytes: int, lanes: _Lanes):
        self.lanes = lanes
        self.slots = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=lanes.cuda) for _ in range(2)]
        self.done = [None, None]
        self.next = 0

    def take(self, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[int, torch.Tensor]:
        slot = self.next
        self.next ^= 1
        self.lanes.host_wait(self.done[slot])
        count = 1
        for s in shape:
            count *= s
        size = torch.empty(0, dtype=dtype).element_size()
        return slot, self.slots[slot][: count * size].view(dtype).view(shape)

    def mark(self, slot: int, stream) -> None:
        if self.lanes.cuda:
            self.done[slot] = torch.cuda.Event()
            self.done[slot].record(stream)


class StreamingExecutor:
    """Merges tensors on ``device`` within ``max_gpu_memory`` bytes of device memory (see the module docstring)."""

    def __init__(self, device: torch.device | str, max_gpu_memory: int, *,
                 staging_bytes: int = DEFAULT_STAGING_BYTES):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.budget = int(max_gpu_memory)
        self.lanes = _Lanes(self.device)
        self.staging_bytes = int(staging_bytes)
        self.stage_in = _Staging(self.staging_bytes, self.lanes)
        self.stage_out = _Staging(self.staging_bytes, self.lanes)
        self.stats = GpuStats()

    def plan(self, name: str, rows: int, row_numel: int, n_inputs: int, in_dtype: torch.dtype,
             out_dtype: torch.dtype, merge: FusedMerge) -> ChunkPlan:
        fp = Footprint(name, rows, row_numel, n_inputs, _itemsize(in_dtype), _itemsize(out_dtype),
                       merge.scratch_per_element, merge.fixed_bytes)
        return plan_chunks(fp, self.budget, allocator_slack=self.device.type == "cuda")

    def merge_tensor(self, name: str, sources: Sequence[torch.Tensor], rows: int, row_numel: int,
                     merge: FusedMerge, out_dtype: torch.dtype,
                     write: Callable[[torch.Tensor, int], None]) -> ChunkPlan:
        """Runs ``merge``'s passes over the tensor whose inputs are ``sources`` (host tensors of rows * row_numel
        elements, in ``merge.load_order``) and hands each output chunk ([rows, row_numel] host tensor of
        out_dtype, valid only during the call) to ``write(out, row_start)``, in row order."""
        in_dtype = _stack_dtype(sources, name)
        plan = self.plan(name, rows, row_numel, len(sources), in_dtype, out_dtype, merge)
        self.stats.tensors += 1
        if not plan.chunks:
            return plan
        if not plan.resident:
            self.stats.chunked_tensors += 1
        views = [s.reshape(rows, row_numel) for s in sources]
        dev, lanes, n_buf = self.device, self.lanes, plan.buffers
        step_rows = plan.rows_per_chunk
        stacks = [torch.empty((len(sources), step_rows, row_numel), dtype=in_dtype, device=dev) for _ in range(n_buf)]
        outs = [torch.empty((step_rows, row_numel), dtype=out_dtype, device=dev) for _ in range(n_buf)]
        loaded = [lanes.event() for _ in range(n_buf)]
        computed = [lanes.event() for _ in range(n_buf)]
        downloaded = [lanes.event() for _ in range(n_buf)]
        chunks = plan.chunks
        for p in range(merge.reduce_passes + 1):
            is_map = p == merge.reduce_passes
            if not plan.resident or p == 0:
                self._upload(views, chunks[0], stacks[0], computed[0], loaded[0], p)  # after last pass's use
            for i, (a, b) in enumerate(chunks):
                slot = i % n_buf
                lanes.wait(lanes.compute if lanes.cuda else None, loaded[slot])
                chunk = DeviceChunk(a, b, stacks[slot][:, : b - a])
                if is_map:
                    lanes.wait(lanes.compute if lanes.cuda else None, downloaded[slot])  # outs[slot] is free
                    merge.map(chunk, outs[slot][: b - a])
                else:
                    merge.reduce(p, chunk)
                lanes.record(computed[slot], lanes.compute if lanes.cuda else None)
                self.stats.trace.append(("map" if is_map else "reduce", p, a, b))
                if i + 1 < len(chunks) and not plan.resident:  # read the next chunk while this one computes
                    nxt = (i + 1) % n_buf
                    self._upload(views, chunks[i + 1], stacks[nxt], computed[nxt], loaded[nxt], p)
                if is_map:
                    self._download(outs[slot][: b - a], a, computed[slot], downloaded[slot], write, p)
            if not is_map:
                merge.end_pass(p)
        if lanes.cuda:
            torch.cuda.current_stream(dev).synchronize()
        return plan

    def _upload(self, views, rows: tuple[int, int], dst: torch.Tensor, after, loaded, p: int) -> None:
        """Rows [a, b) of every input into dst[:, :b - a], through the staging slots, on the H2D stream."""
        a, b = rows
        lanes = self.lanes
        n_in, row_numel = dst.shape[0], dst.shape[2]
        per = staging_rows(n_in * row_numel * dst.element_size(), self.staging_bytes, b - a)
        lanes.wait(lanes.h2d if lanes.cuda else None, after)  # dst is free once its last chunk was computed
        for r0 in range(a, b, per):
            r1 = min(b, r0 + per)
            slot, stage = self.stage_in.take(dst.dtype, (n_in, r1 - r0, row_numel))
            for j, v in enumerate(views):
                stage[j].copy_(v[r0:r1])  # the read from the memory map (a widening copy when dtypes differ)
            with lanes.on(lanes.h2d if lanes.cuda else None):
                # One copy per input: each input's rows are contiguous in dst, the inputs together are not
                # (dst holds step_rows per input), and a host-to-device copy into a strided destination goes
                # through a device temporary of the whole piece (65 MiB over the budget, seen on an H100).
                for j in range(n_in):
                    dst[j, r0 - a : r1 - a].copy_(stage[j], non_blocking=lanes.cuda)
                self.stage_in.mark(slot, lanes.h2d if lanes.cuda else None)
            self.stats.bytes_uploaded += stage.numel() * stage.element_size()
        lanes.record(loaded, lanes.h2d if lanes.cuda else None)
        self.stats.trace.append(("upload", p, a, b))

    def _download(self, src: torch.Tensor, row_start: int, after, downloaded, write, p: int) -> None:
        """src (device rows) to the host through the staging slots on the D2H stream; write() each piece."""
        lanes = self.lanes
        rows, row_numel = src.shape
        per = staging_rows(row_numel * src.element_size(), self.staging_bytes, rows)
        lanes.wait(lanes.d2h if lanes.cuda else None, after)
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            slot, stage = self.stage_out.take(src.dtype, (r1 - r0, row_numel))
            with lanes.on(lanes.d2h if lanes.cuda else None):
                stage.copy_(src[r0:r1], non_blocking=lanes.cuda)
                self.stage_out.mark(slot, lanes.d2h if lanes.cuda else None)
            lanes.host_wait(self.stage_out.done[slot])
            write(stage, row_start + r0)
            self.stats.bytes_downloaded += stage.numel() * stage.element_size()
        lanes.record(downloaded, lanes.d2h if lanes.cuda else None)
        self.stats.trace.append(("download", p, row_start, row_start + rows))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _stack_dtype(sources: Sequence[torch.Tensor], name: str) -> torch.dtype:
    """The device stack's dtype: the inputs' stored dtype, or float32 (an exact widening) when they differ."""
    if not sources:
        raise MergeError(f"tensor '{name}': no inputs")
    dtypes = {s.dtype for s in sources}
    if not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        raise MergeError(f"tensor '{name}': the GPU engine merges float32/float16/bfloat16 inputs, got "
                         f"{sorted(str(d) for d in dtypes)}")
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def merge_planned_tensor(plan, pt, write: Callable[[torch.Tensor, int], None], engine: StreamingExecutor,
                         kernels) -> ChunkPlan:
    """The GPU counterpart of ``pymerge.executor.merge_tensor`` for one planned tensor: its fused merge
    (``fused.fused_merge``) run by ``engine`` on the memory-mapped inputs; ``write(out_rows, row_start)``."""
    from .fused import fused_merge

    job = pt.job
    merge = fused_merge(plan.method.spec.name, job, kernels)
    views = [plan.checkpoints[m].tensor(name) for m, name in pt.sources]
    ordered = [views[i] for i in merge.load_order]
    return engine.merge_tensor(job.name, ordered, job.rows, job.row_numel, merge, pt.out_dtype, write)


def merge_tensors_gpu(method: str, job, tensors: Sequence[torch.Tensor], out_dtype: torch.dtype,
                      engine: StreamingExecutor, kernels) -> torch.Tensor:
    """One tensor merged by ``engine`` from in-memory host ``tensors`` (in job input order); returns the host
    output of the job's shape. For tests and benchmarks."""
    from .fused import fused_merge

    merge = fused_merge(method, job, kernels)
    out = torch.empty(job.rows, job.row_numel, dtype=out_dtype)

    def write(rows: torch.Tensor, row_start: int) -> None:
        out[row_start : row_start + rows.shape[0]].copy_(rows)

    engine.merge_tensor(job.name, [tensors[i] for i in merge.load_order], job.rows, job.row_numel, merge,
                        out_dtype, write)
    return out.reshape(job.shape)


__all__ = ["StreamingExecutor", "GpuStats", "merge_planned_tensor", "merge_tensors_gpu"]
