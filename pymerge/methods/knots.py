"""KnOTS (``merge_method: knots``): SVD-align the task vectors of each 2-D tensor, merge their coordinates.

Per 2-D tensor (the job's [rows, row_numel] view), with τ_t = θ_t − θ_0 for the T experts:

    [τ_1 | … | τ_T] ≈ U diag(S) [V_1ᵀ | … | V_Tᵀ]      rank-``rank`` streamed randomized SVD, components S > eps
    V_mᵀ = ties / dare_ties / task_arithmetic of the V_tᵀ blocks (``merge``; ``weight``/``density`` per model)
    θ = θ_0 + λ · U diag(S) V_mᵀ
Tensors of fewer than 2 dims are averaged: θ = θ_0 + mean_t τ_t (methods.md §C).

Passes: the SVD's 2 + 2·power_iters reduce passes read [τ_1 | … | τ_T] row chunk by row chunk
(``ops.randomized_svd.StreamedSVD``, bit-identical for any chunking), the small merge of the V blocks runs once,
and the map pass writes θ_0 + λ U S V_mᵀ computed over fixed 256-row blocks, so the output does not depend on
the chunking either. With LoRA inputs the task vectors have rank ≤ Σ r_t, and ``rank`` ≥ Σ r_t makes the SVD
exact; a larger true rank is truncated to ``rank`` components (the reference uses the full SVD).

The reference (fusion_bench ``knots_utils.subspace_alignment``) works on LoRA factors; ``pymerge.ops.knots``
has that exact QR route, which this file-level method cannot use yet because methods only see dense rows.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops.consensus import stack_sum
from ..ops.knots import DEFAULT_EPS, ELEMENT_MERGES, merge_aligned
from ..ops.randomized_svd import CANONICAL_ROWS, StreamedSVD
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


class _KnotsMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        p = job.params
        self.job = job
        self.base = job.base_index
        self.experts = job.expert_indices
        self.lam = float(p["lambda"])
        self.merge = str(p["merge"])
        if self.merge not in ELEMENT_MERGES:
            raise ConfigError(f"knots: tensor '{job.name}': merge must be one of {', '.join(ELEMENT_MERGES)}, "
                              f"got {self.merge!r}")
        if int(p["rank"]) < 1 or float(p["eps"]) < 0:
            raise ConfigError(f"knots: rank must be >= 1 and eps >= 0, got rank {p['rank']}, eps {p['eps']}")
        self.svd: StreamedSVD | None = None
        self.nonzero = False  # pass 0 saw a nonzero task-vector element
        self.zero = False  # every task vector of this tensor is exactly zero (e.g. a module no adapter touches)
        self.u: torch.Tensor | None = None
        self.right: torch.Tensor | None = None
        self._cached: tuple[int, torch.Tensor] | None = None
        if len(job.shape) >= 2 and self.experts:
            n = job.row_numel * len(self.experts)
            k = min(int(p["rank"]), job.rows, n)
            self.svd = StreamedSVD((job.rows, n), k, oversample=int(p["oversample"]),
                                   power_iters=int(p["power_iters"]), seed=job.seed, name=f"tensor '{job.name}'")
            self.reduce_passes = self.svd.passes

    def _concat(self, chunk: Chunk) -> torch.Tensor:
        """Rows of [τ_1 | … | τ_T]: [rows, T · row_numel]."""
        taus = chunk.data[self.experts] - chunk.data[self.base]  # [T, rows, n]
        return taus.permute(1, 0, 2).reshape(chunk.data.shape[1], -1)

    def reduce(self, p: int, chunk: Chunk) -> None:
        if p == 0:
            block = self._concat(chunk)
            self.nonzero = self.nonzero or bool(block.any())
            self.svd.consume(p, chunk.row_start, block)
        elif not self.zero:
            self.svd.consume(p, chunk.row_start, self._concat(chunk))

    def end_pass(self, p: int) -> None:
        if p == 0:
            self.zero = not self.nonzero  # the remaining SVD passes are skipped
        if self.zero:
            return
        self.svd.end_pass(p)
        if p == self.svd.passes - 1:
            u, s, vh = self.svd.result()
            keep = s.double() > float(self.job.params["eps"])
            n = self.job.row_numel
            vhs = list(torch.split(vh[keep].double(), n, dim=1))
            mp = [self.job.model_params[i] for i in self.experts]
            # merge_aligned(eye, ...) returns λ · diag(S) V_mᵀ: the right factor, [k, n]
            k = int(keep.sum())
            self.right = merge_aligned(torch.eye(k, dtype=torch.float64), s[keep].double(), vhs, merge=self.merge,
                                       weights=[m["weight"] for m in mp], densities=[m["density"] for m in mp],
                                       consensus_method=str(self.job.params["consensus_method"]),
                                       lambda_=self.lam, seed=self.job.seed, name=self.job.name,
                                       model_ids=[self.job.model_ids[i] for i in self.experts]).float()
            self.u = u[:, keep].contiguous()
            self.svd = None

    def _delta_block(self, c: int) -> torch.Tensor:
        """Rows [c, c + 256) of λ U S V_mᵀ, always computed as that whole fixed block (same bits every time)."""
        if self._cached is None or self._cached[0] != c:
            self._cached = (c, self.u[c:c + CANONICAL_ROWS] @ self.right)
        return self._cached[1]

    def map(self, chunk: Chunk) -> torch.Tensor:
        base = chunk.data[self.base]
        if not self.experts:
            return base.clone()
        if len(self.job.shape) < 2:
            return base + stack_sum(chunk.data[self.experts] - base) / len(self.experts)
        if self.zero or self.u.shape[1] == 0:
            return base.clone()
        a, b = chunk.row_start, chunk.row_stop
        parts = []
        for c in range(a - a % CANONICAL_ROWS, b, CANONICAL_ROWS):
            blk = self._delta_block(c)
            parts.append(blk[max(a, c) - c:min(b, c + CANONICAL_ROWS) - c])
        return base + torch.cat(parts, dim=0)


class Knots(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        if job.base_index is None:
            raise ConfigError("knots needs a base_model")
        return _KnotsMerge(job)


def methods() -> list[Method]:
    spec = MethodSpec(
        name="knots",
        params=(
            ParamSpec("weight", float, default=1.0, per_model=True, doc="weight of the model's aligned update"),
            ParamSpec("density", float, default=1.0, per_model=True,
                      doc="fraction of each V_t block kept (ties, dare_ties)"),
            ParamSpec("merge", str, default="ties",
                      doc="merge of the aligned blocks: ties, dare_ties, task_arithmetic"),
            ParamSpec("consensus_method", str, default="sum", doc="sign election of ties/dare_ties: sum or count"),
            ParamSpec("lambda", float, default=1.0, doc="scale of the merged update"),
            ParamSpec("rank", int, default=128,
                      doc="components of the joint SVD (>= the sum of the LoRA ranks makes it exact)"),
            ParamSpec("eps", float, default=DEFAULT_EPS, doc="singular values <= eps are dropped"),
            ParamSpec("oversample", int, default=10, doc="extra sketch columns of the randomized SVD"),
            ParamSpec("power_iters", int, default=2, doc="power iterations of the randomized SVD"),
        ),
        needs_base=True, min_inputs=2,
        reference="Stoica et al., Model merging with SVD to tie the KnOTS, ICLR 2025; "
                  "fusion_bench/method/knots/knots_utils.py",
        doc="SVD-align the task vectors of each 2-D tensor, merge the aligned coordinates with TIES/DARE/TA",
    )
    return [Knots(spec=spec, scratch_factor=2.5)]
