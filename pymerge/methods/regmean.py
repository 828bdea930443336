"""RegMean: for each linear weight, the least-squares merge that best reproduces every model's outputs on
its own inputs, from per-model input Gram matrices G_t = X_t^T X_t / n (d_in x d_in).

    G~_t   = alpha * G_t + (1 - alpha) * diag(G_t)       (alpha = reduce_non_diagonal_ratio)
    S      = sum_t G~_t
    W*^T   = S^-1 sum_t G~_t W_t^T    <=>    W* = (sum_t W_t G~_t) S^-1    (G~, S symmetric)
Tensors without Grams (1-D tensors, embeddings, weights left out of the Gram files) are averaged over the
inputs, as MergeLM's ``regmean_merging`` (FusionBench's is the same code; alpha defaults: MergeLM 1.0,
FusionBench 0.1 generic, 0.95 CLIP, 0.6 GPT-2).

The second form is row-local (row r of W* needs only row r of every W_t), so the map pass runs on any row
chunk. Numerics: Grams, the products and the solve in float64; S^-1 from a Cholesky factor, falling back to
a pseudo-inverse (eigenvalues below 1e-12 * the largest dropped) when S is not numerically positive definite
(an input feature no model ever saw gives a zero row and column). The product with S^-1 is taken on blocks
of ``_BLOCK`` rows aligned to absolute row indices (partial blocks zero-padded) so every row goes through a
GEMM of the same shape at the same position whatever the chunking: BLAS may sum in a shape-dependent order.

Memory beyond the executor's chunk budget: S^-1 and every model's G~ in float64, (T + 1) * d_in^2 * 8 bytes
per tensor while it is merged (Llama-70B down_proj, d_in = 28672: 6.6 GB each).
"""

from __future__ import annotations

import logging

import torch

from ..errors import ConfigError, MergeError
from ..io.statistics import GRAM
from ..ops.consensus import stack_sum
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge

log = logging.getLogger("pymerge")

_BLOCK = 64  # rows per GEMM block (absolute-row aligned)
_PINV_RTOL = 1e-12


def reduce_non_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G off the diagonal, G on it (float64)."""
    g = gram.to(torch.float64) * alpha
    g.diagonal().copy_(gram.diagonal().to(torch.float64))
    return g


def symmetric_inverse(s: torch.Tensor, name: str) -> torch.Tensor:
    """S^-1 for symmetric S (float64): Cholesky when S is positive definite, else the pseudo-inverse."""
    chol, info = torch.linalg.cholesky_ex(s)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    evals, evecs = torch.linalg.eigh(s)
    cut = _PINV_RTOL * float(evals.abs().max()) if evals.numel() else 0.0
    keep = evals > cut
    log.warning("regmean: tensor '%s': the summed Gram matrix is not positive definite (%d of %d eigenvalues "
                "<= %.3g); using its pseudo-inverse", name, int((~keep).sum()), evals.numel(), cut)
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return (evecs * inv) @ evecs.T


class _RegMeanMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        self.job = job
        self.alpha = float(job.params["reduce_non_diagonal_ratio"])
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"regmean: reduce_non_diagonal_ratio must be in [0, 1], got {self.alpha}")
        grams = job.aux.get("gram") or [None] * len(job.inputs)
        have = [g is not None for g in grams]
        if any(have) and not all(have):
            missing = [m for m, h in zip(job.inputs, have) if not h]
            raise MergeError(f"regmean: tensor '{job.name}' has Gram matrices for some models but not for "
                             f"{', '.join(repr(m) for m in missing)}; give every model's Gram or none")
        self.grams = grams if all(have) else None
        if self.grams is not None:
            d = job.shape[1] if len(job.shape) == 2 else None
            for m, g in zip(job.inputs, self.grams):
                if d is None or tuple(g.shape) != (d, d):
                    raise MergeError(f"regmean: Gram of model '{m}' for tensor '{job.name}' has shape "
                                     f"{list(g.shape)}, expected [{d}, {d}] for a weight of shape {list(job.shape)}")
        self._solved = None  # (G~_t list, S^-1), built on the first map call

    def _solve(self):
        if self._solved is None:
            reduced = [reduce_non_diagonal(g, self.alpha) for g in self.grams]
            s = stack_sum(torch.stack(reduced)) if len(reduced) > 1 else reduced[0].clone()
            self._solved = (reduced, symmetric_inverse(s, self.job.name))
        return self._solved

    def map(self, chunk: Chunk) -> torch.Tensor:
        data = chunk.data
        if self.grams is None:
            return stack_sum(data) / data.shape[0]
        reduced, s_inv = self._solve()
        a, b = chunk.row_start, chunk.row_stop
        out = torch.empty(b - a, data.shape[2], dtype=torch.float32)
        first = a - a % _BLOCK
        for blk in range(first, b, _BLOCK):
            lo, hi = max(blk, a), min(blk + _BLOCK, b)
            acc = torch.zeros(_BLOCK, data.shape[2], dtype=torch.float64)
            for i, g in enumerate(reduced):  # every row sits at its absolute offset inside the block
                w = torch.zeros(_BLOCK, data.shape[2], dtype=torch.float64)
                w[lo - blk:hi - blk] = data[i, lo - a:hi - a]
                acc += w @ g
            out[lo - a:hi - a] = (acc @ s_inv)[lo - blk:hi - blk]
        return out


class RegMean(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _RegMeanMerge(job)


def methods() -> list[Method]:
    spec = MethodSpec(
        name="regmean",
        params=(
            ParamSpec("gram", str, per_model=True, required=True, statistics=GRAM,
                      doc="safetensors file of the model's input Gram matrices, keyed by linear weight name"),
            ParamSpec("reduce_non_diagonal_ratio", float, default=1.0,
                      doc="alpha: scale of the Grams' off-diagonal entries (1 = plain RegMean)"),
        ),
        needs_base=False, min_inputs=1,
        reference="https://arxiv.org/abs/2212.09849 (yule-BUAA/MergeLM merging_methods.py::regmean_merging)")
    # scratch: a float64 block accumulator and product per input block (small), the fp32 output rows
    return [RegMean(spec=spec, scratch_factor=1.0)]
