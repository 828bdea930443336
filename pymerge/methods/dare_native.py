"""DARE and DELLA (``dare_ties``, ``dare_linear``, ``della``, ``della_linear``) on the native CPU kernels: the
same bytes as the torch merge of task_arithmetic.py + sparsify.py, read once per pass from the memory maps in
their stored dtype (no fp32 copies of the expert stack).

  rescale on   one reduce pass: ``dare_l1_rows`` gives each row's fp64 L1 norm before and after masking (the
               Philox mask drawn in the kernel), summed exactly across rows as the torch ``Sparsifier`` does;
               its ``end_pass`` turns them into the per-expert scales. When rows hold a multiple of 8
               elements it also keeps the masks as bits for the map (the last chunk's, when chunked)
  map          one fused ``dare_map`` pass: masks (those bits, or drawn again), rescale, weights, sign
               election, base, narrow

DELLA's keep probabilities depend on each element's rank of |tau| along the tensor's dim 1; for vectors and
matrices that is a chunk row, ranked by ``della_probs`` (a radix sort per row, 7x torch's sort on 4096-wide
rows); tensors of more dims use the torch sparsifier's own ``della_probabilities``. Either way they reach the
kernels as fp32 buffers.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .base import Chunk, TensorJob
from .native_dispatch import NativeTaskVectorMerge, native_dtypes_unsupported
from .sparsify import Sparsifier, della_probabilities

if TYPE_CHECKING:  # pragma: no cover
    from .task_arithmetic import GeneralizedTaskArithmetic

# DELLA's working memory per element and expert. With its rows ranked natively (``native_cpu.della_probs``: a
# matrix ranked along its rows, the tensor's dim 1) only the fp32 probabilities kept for the kernels count
# (4 B; the per-thread sort buffers hold a few rows). Ranked with torch ops (tensors of 3+ dims, whose dim 1 is
# not a chunk's row): fp32 task vector and keys (8 B), the sort's values and int64 indices (16 B), int64 ranks
# and their fp32 ratio (12 B) and the probabilities (4 B), rounded up to 48 B.
_NATIVE_RANK_SCRATCH = 4.0
_TORCH_RANK_SCRATCH = 48.0


class _SpareProbs:
    """DELLA's fp32 probability buffers, kept from one chunk to the next of the same shape.

    A fresh buffer pays a page fault and a page clear per 4 KiB on first write: 18 ms of the 101 ms that ranking a
    2048 x 8192 bf16 chunk took, and a 1B model's DELLA merge writes 12 GB of probabilities (3 experts). The
    tensors of a model repeat a few shapes (the MLP's three share one), so buffers of the shape just used are
    kept for the next chunk; a chunk of another shape frees them before allocating its own, so no more than one
    chunk's probabilities (what the executor's budget counts) are ever held."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        with self._lock:
            if self._free and tuple(self._free[0].shape) == shape:
                return self._free.pop()
            self._free = []
        return torch.empty(shape, dtype=torch.float32)

    def give(self, buffers: list) -> None:
        with self._lock:
            for b in buffers:
                if isinstance(b, torch.Tensor) and b.dtype == torch.float32:
                    if self._free and self._free[0].shape != b.shape:
                        self._free = []
                    self._free.append(b)


_SPARE_PROBS = _SpareProbs()


def ranks_natively(job: TensorJob) -> bool:
    """Whether DELLA's ranks of ``job`` run on the native kernel: its rank dimension is a whole chunk row."""
    return len(job.shape) <= 2


def della_scratch_per_element(job: TensorJob) -> float:
    """Bytes of DELLA working memory per element of a chunk (all experts), as the executor counts them."""
    per_expert = _NATIVE_RANK_SCRATCH if ranks_natively(job) else _TORCH_RANK_SCRATCH
    return per_expert * len(job.expert_indices)


def native_dare_unsupported(method: "GeneralizedTaskArithmetic", job: TensorJob) -> str | None:
    """Why the native CPU DARE/DELLA kernels cannot merge ``job`` with ``method`` (None when they can)."""
    if method.sparsifier not in ("random", "della_magprune"):
        return f"merge method '{method.spec.name}' is not a DARE/DELLA method"
    if job.base_index is None or not job.expert_indices:
        return "the native kernels need a base model and at least one other model"
    return native_dtypes_unsupported(job)


class NativeDareMerge(NativeTaskVectorMerge):
    """dare_* / della* of one tensor on the native CPU kernels (module docstring)."""

    def __init__(self, method: "GeneralizedTaskArithmetic", job: TensorJob):
        super().__init__(job)
        p = job.params
        self.consensus = p.get("consensus_method", "sum") if method.consensus else None
        if self.consensus not in (None, "sum", "count"):
            raise ConfigError(f"{job.name}: consensus_method must be 'sum' or 'count', got {self.consensus!r}")
        # The torch sparsifier validates the parameters and owns the rescale state (its L1 sums and scales).
        self.sp = Sparsifier(method.sparsifier, job, self.experts, bool(p["rescale"]))
        self.della = method.sparsifier == "della_magprune"
        self.reduce_passes = self.sp.passes
        # The rescale pass reads the base and every expert it masks; a NaN/Inf in any of them makes that row's
        # fp64 sum of |tau| NaN/Inf (the sum of 2^31 fp32 magnitudes cannot overflow fp64), so when it masks every
        # expert it replaces the executor's scan of the inputs.
        self.finds_nonfinite = self.reduce_passes > 0 and not any(self.sp.dense)
        self.ids = [job.model_ids[i] for i in self.experts]
        self.native_ranks = self.della and ranks_natively(job)
        if self.della:
            self.raw_scratch_per_element = della_scratch_per_element(job)
        # With rescale the L1 pass keeps each expert's mask as bits (1/8 byte per element and expert) for the map,
        # which then draws no Philox words (~17 of ~44 ms of the map for 3 x 16.8M). Whole bytes per row only.
        self.keeps_bits = self.reduce_passes > 0 and job.row_numel % 8 == 0
        if self.keeps_bits:
            self.raw_scratch_per_element += len(self.experts) / 8
        self._bits: tuple[int, dict[int, torch.Tensor]] | None = None  # (row_start, expert -> mask bits)
        self._probs_cache: tuple[int, list] | None = None  # (row_start, probs): a resident tensor ranks once

    def _probs(self, chunk: Chunk, base: torch.Tensor, experts: list[torch.Tensor]) -> list:
        """Per expert the keep probability (a float: 1.0 for an expert passed through whole, DARE's density)
        or, for DELLA, an fp32 tensor of per-element probabilities for this chunk."""
        sp = self.sp
        if not self.della:
            return [1.0 if dense else d for dense, d in zip(sp.dense, sp.density)]
        if self._probs_cache is not None and self._probs_cache[0] == chunk.row_start:
            return self._probs_cache[1]
        if self._probs_cache is not None and self.native_ranks:
            _SPARE_PROBS.give(self._probs_cache[1])  # the previous chunk's: its pass is over
        self._probs_cache = None
        probs: list = []
        for e, x in enumerate(experts):
            if sp.dense[e]:
                probs.append(1.0)
            elif sp.density[e] <= 0:
                probs.append(0.0)
            elif self.native_ranks:
                out = _SPARE_PROBS.take(tuple(base.shape))
                probs.append(self.nc.della_probs(base, x, sp.density[e], sp.eps[e], out=out))
            else:
                tau = x.to(torch.float32) - base.to(torch.float32)
                probs.append(della_probabilities(tau, sp.density[e], sp.eps[e], sp.rank_dim).contiguous())
        self._probs_cache = (chunk.row_start, probs)
        return probs

    def reduce(self, p: int, chunk: Chunk) -> None:
        base, experts = self._inputs(chunk)
        probs = self._probs(chunk, base, experts)
        todo = [e for e in range(len(experts)) if not self.sp.dense[e]]
        bits = None
        if self.keeps_bits:
            bits = {e: torch.empty(base.numel() // 8, dtype=torch.uint8) for e in todo}
            self._bits = (chunk.row_start, bits)  # a later chunk replaces it: only the last one stays for the map
        norms = self.nc.dare_l1_rows(base, [experts[e] for e in todo], seed=self.job.seed,
                                     model_ids=[self.ids[e] for e in todo], tensor_name=self.job.name,
                                     probs=[probs[e] for e in todo], start=chunk.flat_start,
                                     keep_bits=None if bits is None else [bits[e] for e in todo])
        if self.nonfinite_found is not None and todo and not bool(torch.isfinite(norms[:, :, 0]).all()):
            self.nonfinite_found()
        for row, e in enumerate(todo):
            self.sp.l1[e].add_rows(norms[row])

    def end_pass(self, p: int) -> None:
        self.sp.end_pass(p)

    def map(self, chunk: Chunk) -> torch.Tensor:
        base, experts = self._inputs(chunk)
        probs = self._probs(chunk, base, experts)
        self._probs_cache = None  # the last pass over this chunk
        keep_bits = None
        if self._bits is not None and self._bits[0] == chunk.row_start:
            keep_bits = [self._bits[1].get(e) for e in range(len(experts))]
            self._bits = None
        out = self.nc.dare_map(base, experts, self.weights, seed=self.job.seed, model_ids=self.ids,
                               tensor_name=self.job.name, probs=probs, scales=self.sp.scale,
                               start=chunk.flat_start, consensus=self.consensus, normalize=self.normalize,
                               lambda_=self.lam, out_dtype=self.job.out_dtype, keep_bits=keep_bits)
        if self.native_ranks:
            _SPARE_PROBS.give(probs)  # read by nothing after this map
        return out
