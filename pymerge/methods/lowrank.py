"""Shared engine of the SVD merge family (TSV-M, Iso-C/CTS, STAR, CART): the pass plumbing, not the math.

Each method's merged task vector of a 2-D tensor is a function of whole matrices (per-task SVDs), so a
``LowRankMerge`` runs in one of two modes, chosen per tensor from the method's rank (``svd_mode``):

* **exact** (full SVD; the rank is a large fraction of min(m, n), or the method needs the whole spectrum):
  reduce pass 0 gathers the fp32 matrices the method decomposes (task vectors, or their centred versions),
  holding a reference to the resident chunk when the tensor is one chunk and copying rows otherwise;
  ``end_pass`` runs the method's dense float64 math (the reference's formulas) and keeps the merged delta
  [m, n] in fp32. State: T fp32 matrices plus one fp64 matrix and its SVD at a time.
* **randomized** (rank k small): every reduce pass feeds each row chunk to one ``StreamedSVD`` per task
  (2 + 2 * power_iters passes, O((m + n)(k + oversample)) state per task), ``end_pass`` of the last one does the
  small dense math and keeps the merged delta as factors L [m, K], R [K, n] (fp32); the map pass forms the
  delta rows of its chunk as L[rows] @ R.

Both modes give the same bits for any chunking: exact mode decomposes the same gathered values, the streamed
SVD re-cuts rows into fixed canonical blocks, and the map forms L @ R over those same fixed row blocks
(a GEMM's per-row result may depend on how many rows it is given). The map pass computes
``theta = anchor + scale * delta`` in fp32, where anchor is the base (or, for CART, the average model).

Tensors that are not 2-D (norms, biases, conv kernels) follow each method's rule, a mean of task vectors for
all four references (their code sends every non-2-D tensor to a plain average).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops.randomized_svd import CANONICAL_ROWS, StreamedSVD
from .base import Chunk, Method, ParamSpec, TensorJob, TensorMerge

OVERSAMPLE = 10
POWER_ITERS = 2
SVD_MODES = ("auto", "exact", "randomized")

SVD_MODE_PARAM = ParamSpec("svd_mode", str, default="auto",
                           doc="'exact' (full SVD), 'randomized' (streamed HMT sketch) or 'auto' (randomized when "
                               "(rank + 10) * 3 < min(m, n), i.e. when the sketch passes cost less than a full SVD)")


def use_randomized(mode: str, rank: int, shape: tuple[int, int], name: str, method: str) -> bool:
    """Whether a rank-``rank`` SVD of an m x n matrix runs randomized under ``svd_mode``."""
    if mode not in SVD_MODES:
        raise ConfigError(f"{method}: tensor '{name}': svd_mode must be one of {', '.join(SVD_MODES)}, got {mode!r}")
    if mode == "exact" or rank < 1:
        return False
    if mode == "randomized":
        return True
    return (rank + OVERSAMPLE) * (1 + POWER_ITERS) < min(shape)


def expert_sum(chunk: Chunk, experts: list[int], base: int, weights: list[float] | None = None) -> torch.Tensor:
    """sum_t w_t (x_t - base) over a chunk, in a fixed expert order (identical bits for any chunk shape)."""
    acc = None
    for j, e in enumerate(experts):
        tau = chunk.data[e] - chunk.data[base]
        if weights is not None:
            tau = tau * weights[j]
        acc = tau if acc is None else acc + tau
    return acc


def lowrank_rows(left: torch.Tensor, right: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of left @ right, computed over fixed canonical row blocks so the bits do not depend on
    (a, b)."""
    parts = []
    first = (a // CANONICAL_ROWS) * CANONICAL_ROWS
    for s in range(first, b, CANONICAL_ROWS):
        e = min(s + CANONICAL_ROWS, left.shape[0])
        block = left[s:e] @ right
        parts.append(block[max(a - s, 0):min(b, e) - s])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def truncated_svd64(a: torch.Tensor, k: int | None = None):
    """Thin SVD of ``a`` in float64 (U, S, Vh), truncated to the top ``k`` triplets when given."""
    u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
    if k is not None:
        u, s, vh = u[:, :k], s[:k], vh[:k]
    return u, s, vh


def polar64(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of a = P Sigma Q^T (float64), as the references compute it."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


class LowRankMerge(TensorMerge):
    """Pass plumbing for one tensor. Subclasses set, in ``setup_matrix`` (2-D tensors only):

    * ``self.sources``: fp32 matrices to decompose, as a function of a chunk -> list of [rows, n] tensors;
    * exact mode: ``dense(mats) -> delta`` (float64 [m, n]) from the gathered fp64 matrices;
    * randomized mode: ``self.ranks`` (one per source) and ``factors(svds) -> (L, R)`` from the per-source
      (U, S, Vh) triplets (float32);
    and override ``anchor``/``vector_delta``/``scale`` where the method differs from "base + scale * delta".
    """

    method_name = "lowrank"

    def __init__(self, job: TensorJob):
        if job.base_index is None or not job.expert_indices:
            raise ConfigError(f"{self.method_name}: tensor '{job.name}': needs a base_model and at least one other "
                              "model")
        self.job = job
        self.base = job.base_index
        self.experts = job.expert_indices
        self.matrix = len(job.shape) == 2
        self.randomized = False
        self.reduce_passes = 0
        if self.matrix and self.svd_applies():
            self.setup_matrix(job.shape[0], job.shape[1])
            if self.randomized:
                self.svds = [StreamedSVD(job.shape, k, oversample=self.oversample, power_iters=self.power_iters,
                                         seed=job.seed, name=f"{job.name} (task {i})")
                             for i, k in enumerate(self.ranks)]
                self.reduce_passes = self.svds[0].passes if self.svds else 0
            else:
                self.reduce_passes = 1
                self.gathered: list[torch.Tensor] | None = None
        else:
            self.matrix = False
        self.delta: torch.Tensor | None = None
        self.left = self.right = None

    # --- method hooks ---
    oversample = OVERSAMPLE
    power_iters = POWER_ITERS
    scale = 1.0

    def svd_applies(self) -> bool:
        """Whether this 2-D tensor gets the SVD treatment (CART restricts it by name)."""
        return True

    def setup_matrix(self, m: int, n: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def sources(self, chunk: Chunk) -> list[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def dense(self, mats: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def factors(self, svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):  # pragma: no cover
        raise NotImplementedError

    def anchor(self, chunk: Chunk) -> torch.Tensor:
        """What the scaled delta is added to: the base."""
        return chunk.data[self.base]

    def vector_delta(self, chunk: Chunk) -> torch.Tensor:
        """Delta of a tensor without the SVD treatment: the mean task vector (every reference's rule)."""
        return expert_sum(chunk, self.experts, self.base) / len(self.experts)

    # --- passes ---
    def reduce(self, p: int, chunk: Chunk) -> None:
        mats = self.sources(chunk)
        if self.randomized:
            for svd, mat in zip(self.svds, mats):
                svd.consume(p, chunk.row_start, mat)
            return
        if chunk.row_start == 0 and chunk.row_stop == self.job.rows:
            self.gathered = mats  # resident: the chunk is the whole tensor, nothing to copy
            return
        if self.gathered is None:
            m, n = self.job.shape
            self.gathered = [torch.empty(m, n, dtype=torch.float32, device=mat.device) for mat in mats]
        for store, mat in zip(self.gathered, mats):
            store[chunk.row_start:chunk.row_stop].copy_(mat)

    def end_pass(self, p: int) -> None:
        if self.randomized:
            for svd in self.svds:
                svd.end_pass(p)
            if p == self.reduce_passes - 1:
                self.left, self.right = self.factors([svd.result() for svd in self.svds])
                self.svds = None
            return
        mats, self.gathered = self.gathered, None
        self.delta = self.dense(mats).to(torch.float32)

    def map(self, chunk: Chunk) -> torch.Tensor:
        if not self.matrix:
            return self.anchor(chunk) + self.scale * self.vector_delta(chunk)
        if self.randomized:
            delta = lowrank_rows(self.left, self.right, chunk.row_start, chunk.row_stop)
        else:
            delta = self.delta[chunk.row_start:chunk.row_stop]
        return self.anchor(chunk) + self.scale * delta


class LowRankMethod(Method):
    """A registered SVD-family method: ``extra["merge_cls"](job)`` merges one tensor."""

    def start(self, job: TensorJob) -> TensorMerge:
        return self.extra["merge_cls"](job)


# Scratch of a resident tensor in fp32 input copies per input: the gathered task vector (1), its fp64 copy (2)
# and fp64 SVD factors (~2), plus the fp32 delta. Whole-matrix SVD state is not bounded by chunking: with a
# budget smaller than a tensor, the inputs are still read in chunks but the factors (or gathered task vectors
# in exact mode) are whole-tensor sized.
SCRATCH_FACTOR = 5.0
