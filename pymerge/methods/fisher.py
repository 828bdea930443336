"""Fisher merging: a per-element average of the models weighted by their diagonal Fisher information.

    F~_t   = F_t + eps                                   (eps = minimal_fisher_weight, 1e-6)
    c_t    = fisher_scaling_coefficient_t               (relative; the reference's default is 1/T for all)
    c_t   *= (1 / (||F_t|| + eps)) / sum_s (1 / (||F_s|| + eps))     when normalize_fisher_weight
    theta  = sum_t c_t F~_t theta_t / sum_t c_t F~_t

||F_t|| is the L2 norm of model t's Fisher over every merged tensor (raw F, no eps): a whole-model statistic,
so it takes one global pass. As MergeLM's ``fisher_merging`` (FusionBench's is the same code): full weights
are averaged, not task vectors, and a configured base model is one more input with its own Fisher file.

The Fisher diagonals come from one safetensors file per model (per-model parameter ``fisher``), opened and
validated by the plan (pymerge/io/statistics.py); this module only sees their rows as tensors in
``job.aux["fisher"]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError, MergeError
from ..io.statistics import FISHER
from ..ops.exact_sum import ExactSum
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


def _fisher_rows(job: TensorJob, i: int, a: int, b: int) -> torch.Tensor:
    """Rows [a, b) of input i's Fisher diagonal as fp32 (a zero-copy view is widened here)."""
    views = job.aux.get("fisher")
    f = views[i] if views is not None else None
    if f is None:
        raise MergeError(f"fisher: no Fisher statistics for input '{job.inputs[i]}' of tensor '{job.name}' "
                         "(set the per-model parameter 'fisher' to its safetensors file)")
    if f.numel() != job.numel:
        raise MergeError(f"fisher: Fisher statistics of '{job.inputs[i]}' for tensor '{job.name}' have "
                         f"{f.numel()} elements, expected {job.numel} (shape {list(job.shape)})")
    return f.reshape(job.rows, job.row_numel)[a:b].to(torch.float32, copy=True)  # callers modify it in place


def _coefficients(job: TensorJob) -> list[float]:
    coeffs = [float(p["fisher_scaling_coefficient"]) for p in job.model_params]
    if any(c < 0 or not math.isfinite(c) for c in coeffs) or sum(coeffs) <= 0:
        raise ConfigError(f"fisher: fisher_scaling_coefficient must be finite, >= 0 and not all zero; got "
                          f"{dict(zip(job.inputs, coeffs))} for tensor '{job.name}'")
    return coeffs


class _FisherMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        self.job = job
        self.eps = float(job.params["minimal_fisher_weight"])
        if not self.eps >= 0:
            raise ConfigError(f"fisher: minimal_fisher_weight must be >= 0, got {self.eps}")
        coeffs = _coefficients(job)
        if job.params["normalize_fisher_weight"]:
            norms = job.global_state
            if norms is None:
                raise MergeError("fisher: normalize_fisher_weight needs the whole-model Fisher norms (global pass)")
            inv = [1.0 / (n + self.eps) for n in norms]
            coeffs = [c * v / sum(inv) for c, v in zip(coeffs, inv)]
        self.coeffs = coeffs

    def map(self, chunk: Chunk) -> torch.Tensor:
        num = torch.zeros_like(chunk.data[0])
        den = torch.zeros_like(chunk.data[0])
        for i, c in enumerate(self.coeffs):  # models in input order: the same sums whatever the chunking
            w = _fisher_rows(self.job, i, chunk.row_start, chunk.row_stop).add_(self.eps).mul_(c)
            den.add_(w)
            num.add_(w.mul_(chunk.data[i]))
        if bool((den <= 0).any()):
            raise MergeError(f"fisher: tensor '{self.job.name}': the Fisher weights sum to zero or less at some "
                             "element (negative Fisher values, or minimal_fisher_weight 0 with zero Fisher)")
        return num.div_(den)


@dataclass
class _Norms:
    sums: list[ExactSum]


class FisherMerging(Method):
    global_reads_weights = False  # the Fisher-norm pass reads only the statistics (job.aux)

    def start(self, job: TensorJob) -> TensorMerge:
        return _FisherMerge(job)

    # --- normalize_fisher_weight: ||F_t|| over the whole model ---
    def global_passes(self, params: dict) -> int:
        return 1 if params.get("normalize_fisher_weight", True) else 0

    def global_init(self, jobs: list[TensorJob]) -> _Norms:
        return _Norms([ExactSum() for _ in jobs[0].inputs])

    def global_reduce(self, state: _Norms, p: int, job: TensorJob, chunk: Chunk) -> None:
        for i, acc in enumerate(state.sums):
            f = _fisher_rows(job, i, chunk.row_start, chunk.row_stop).to(torch.float64)
            acc.add_rows((f * f).sum(dim=-1))  # fp64 row sums combined exactly: chunking-independent

    def global_end_pass(self, state: _Norms, p: int) -> list[float]:
        return [math.sqrt(acc.values()[0]) for acc in state.sums]


def methods() -> list[Method]:
    spec = MethodSpec(
        name="fisher",
        params=(
            ParamSpec("fisher", str, per_model=True, required=True, statistics=FISHER,
                      doc="safetensors file of the model's diagonal Fisher (same tensor names and shapes)"),
            ParamSpec("fisher_scaling_coefficient", float, default=1.0, per_model=True,
                      doc="relative weight of the model (the reference's fisher_scaling_coefficients)"),
            ParamSpec("normalize_fisher_weight", bool, default=True,
                      doc="scale each model by its normalised 1/||F|| (whole-model L2 norm)"),
            ParamSpec("minimal_fisher_weight", float, default=1e-6, doc="eps added to every Fisher value"),
        ),
        needs_base=False, min_inputs=1,
        reference="https://arxiv.org/abs/2111.09832 (yule-BUAA/MergeLM merging_methods.py::fisher_merging)")
    # scratch: the Fisher rows of one input, the numerator and the denominator
    return [FisherMerging(spec=spec, scratch_factor=1.5)]
