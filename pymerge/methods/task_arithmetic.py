"""Generalized task arithmetic: one pipeline, sparsifier x consensus x normalize, eight methods.

    tau_t   = theta_t - theta_0                         (fp32)
    tau^_t  = sparsify(tau_t) * w_t                      (see sparsify.py)
    m_t     = sgn(tau^_t) == gamma   (consensus methods; gamma from the weighted sum, or the sign count)
    mixed   = sum_t tau^_t m_t,  divisor = sum_t w_t m_t (0 -> 1)        with consensus
    mixed   = sum_t tau^_t,      divisor = sum_t w_t (|.| < 1e-8 -> 1)   without
    theta   = theta_0 + lambda * (mixed / divisor if normalize else mixed)

As mergekit's generalized_task_arithmetic (the names, defaults and parameters are mergekit's):
  task_arithmetic   -                    -      normalize false
  ties              magnitude            sum    normalize true
  dare_ties         random               sum    normalize false, rescale true
  dare_linear       random               -      normalize false, rescale true
  breadcrumbs       magnitude_outliers   -      normalize false
  breadcrumbs_ties  magnitude_outliers   sum    normalize false
  della             della_magprune       sum    normalize true,  rescale true
  della_linear      della_magprune       -      normalize false, rescale true
``ties`` also takes ``trim_scope: global``: one magnitude threshold per model over all of its tensors (the TIES
paper's trim, keeping every |tau| >= the k-th largest), computed by two whole-model histogram passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..ops.consensus import sign_consensus, stack_sum
from ..ops.select import TieCursor, TopKSelector, magnitude_keys
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge
from .sparsify import Sparsifier


def _gta_params(sparsifier: str | None, consensus: bool, normalize: bool, rescale: bool, name: str):
    params = [
        ParamSpec("weight", float, per_model=True, required=True, doc="weight of the model's task vector"),
        ParamSpec("density", float, default=1.0, per_model=True, doc="fraction of the task vector kept"),
        ParamSpec("normalize", bool, default=normalize, doc="divide by the sum of (agreeing) weights"),
        ParamSpec("rescale", bool, default=rescale, doc="L1-rescale each sparsified task vector"),
        ParamSpec("lambda", float, default=1.0, doc="scale of the merged task vector"),
        ParamSpec("int8_mask", bool, default=False, doc="accepted for compatibility; masks are always boolean"),
    ]
    if consensus:
        params.append(ParamSpec("consensus_method", str, default="sum", doc="'sum' (weighted) or 'count'"))
    if sparsifier == "magnitude_outliers":
        params.append(ParamSpec("gamma", float, default=0.01, per_model=True, doc="fraction of largest |tau| removed"))
    if sparsifier == "della_magprune":
        params.append(ParamSpec("epsilon", float, default=0.15, per_model=True, doc="keep-probability spread"))
    if name == "ties":
        params.append(ParamSpec("trim_scope", str, default="tensor", doc="'tensor' (mergekit) or 'global' (paper)"))
    return tuple(params)


class _GTAMerge(TensorMerge):
    def __init__(self, method: "GeneralizedTaskArithmetic", job: TensorJob):
        if job.base_index is None:
            raise ConfigError(f"{method.spec.name} needs a base_model")
        self.job = job
        self.method = method
        self.experts = job.expert_indices
        self.weights = [float(job.model_params[i]["weight"]) for i in self.experts]
        p = job.params
        self.normalize = bool(p["normalize"])
        self.lam = float(p["lambda"])
        self.consensus = p.get("consensus_method", "sum") if method.consensus else None
        if self.consensus not in (None, "sum", "count"):
            raise ConfigError(f"{job.name}: consensus_method must be 'sum' or 'count', got {self.consensus!r}")
        self.global_th = None
        kind = method.sparsifier
        if p.get("trim_scope", "tensor") not in ("tensor", "global"):
            raise ConfigError(f"{job.name}: trim_scope must be 'tensor' or 'global', got {p['trim_scope']!r}")
        if kind == "magnitude" and p.get("trim_scope", "tensor") == "global":
            kind = None  # trimmed by the whole-model thresholds instead
            self.global_th = job.global_state
            if p["rescale"]:
                raise ConfigError("ties: rescale is not supported with trim_scope: global")
        self.sparsifier = Sparsifier(kind, job, self.experts, bool(p["rescale"])) if kind and self.experts else None
        self.reduce_passes = self.sparsifier.passes if self.sparsifier else 0
        self._cache = None

    def _tau(self, chunk: Chunk) -> torch.Tensor:
        """Task vectors of a chunk; a resident tensor (the same chunk buffer every pass) computes them once."""
        if self._cache is not None and self._cache[0] is chunk.data and self._cache[1] == chunk.row_start:
            return self._cache[2]
        data = chunk.data
        tau = data[self.experts] - data[self.job.base_index]
        self._cache = (chunk.data, chunk.row_start, tau)
        return tau

    def reduce(self, p: int, chunk: Chunk) -> None:
        self.sparsifier.reduce(p, self._tau(chunk), chunk.row_start)

    def end_pass(self, p: int) -> None:
        self.sparsifier.end_pass(p)

    def map(self, chunk: Chunk) -> torch.Tensor:
        if not self.experts:
            return chunk.data[self.job.base_index].clone()  # only the base: mergekit returns it
        tau = self._tau(chunk)
        self._cache = None  # map consumes (and modifies) the task vectors
        if self.sparsifier is not None:
            tau = self.sparsifier.apply(tau, chunk.row_start)
        if self.global_th is not None:
            keys = magnitude_keys(tau)
            cursor = TieCursor(1)  # unused by keep-all-ties thresholds, which need no order
            for e, i in enumerate(self.experts):
                tau[e].mul_(cursor.mask(0, keys[e], self.global_th[i]))
        w = torch.tensor(self.weights, dtype=torch.float32).reshape(-1, 1, 1)
        tau.mul_(w)
        if self.consensus:
            agree = sign_consensus(tau, self.consensus)
            mixed = stack_sum(tau * agree)
            divisor = stack_sum(w * agree)
            divisor[divisor == 0] = 1
        else:
            mixed = stack_sum(tau)
            divisor = stack_sum(w)
            divisor[divisor.abs() < 1e-8] = 1
        if self.normalize:
            mixed /= divisor
        if self.lam != 1:
            mixed *= self.lam
        return chunk.data[self.job.base_index] + mixed


@dataclass
class _GlobalTrim:
    """Whole-model top-k thresholds, one selection per expert model (keyed by input position)."""

    selector: TopKSelector
    experts: list[int]
    thresholds: dict | None = None


@dataclass
class GeneralizedTaskArithmetic(Method):
    sparsifier: str | None = None
    consensus: bool = False

    def start(self, job: TensorJob) -> TensorMerge:
        if job.backend != "cpu":
            return _GTAMerge(self, job)
        from .native_dispatch import native_or_torch

        if self.sparsifier in ("random", "della_magprune"):
            from .dare_native import NativeDareMerge, native_dare_unsupported

            return native_or_torch(job, native_dare_unsupported(self, job), lambda: NativeDareMerge(self, job),
                                   lambda: _GTAMerge(self, job))
        from .task_arithmetic_native import NativeGTAMerge, native_gta_unsupported

        return native_or_torch(job, native_gta_unsupported(self, job), lambda: NativeGTAMerge(self, job),
                               lambda: _GTAMerge(self, job))

    # --- trim_scope: global (ties only) ---
    def global_passes(self, params: dict) -> int:
        return 2 if self.spec.name == "ties" and params.get("trim_scope", "tensor") == "global" else 0

    def global_init(self, jobs: list[TensorJob]) -> _GlobalTrim:
        first = jobs[0]
        experts = first.expert_indices
        total = sum(j.numel for j in jobs)
        ks = []
        for i in experts:
            dens = {float(j.model_params[i]["density"]) for j in jobs}
            if len(dens) != 1:
                raise ConfigError(f"trim_scope: global needs one density per model; model '{first.inputs[i]}' "
                                  f"has several ({sorted(dens)}) across tensors")
            d = dens.pop()
            ks.append(total if d >= 1 else int(d * total) if d > 0 else 0)
        return _GlobalTrim(TopKSelector(ks, total, keep_all_ties=True), experts)

    def global_reduce(self, state: _GlobalTrim, p: int, job: TensorJob, chunk: Chunk) -> None:
        tau = chunk.data[state.experts] - chunk.data[job.base_index]
        keys = magnitude_keys(tau).reshape(len(state.experts), -1)
        (state.selector.add_hi if p == 0 else state.selector.add_lo)(keys)

    def global_end_pass(self, state: _GlobalTrim, p: int) -> dict:
        if p == 0:
            state.selector.end_hi()
            return None
        ths = state.selector.end_lo()
        # k >= n keeps everything (key -1); k == 0 keeps nothing; otherwise keep |tau| >= threshold (ties kept)
        state.thresholds = {i: th for i, th in zip(state.experts, ths)}
        return state.thresholds


_TABLE = [
    # name, sparsifier, consensus, normalize, rescale, reference
    ("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    ("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    ("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    ("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    ("breadcrumbs", "magnitude_outliers", False, False, False, "https://arxiv.org/abs/2312.06795"),
    ("breadcrumbs_ties", "magnitude_outliers", True, False, False, "https://arxiv.org/abs/2312.06795"),
    ("della", "della_magprune", True, True, True, "https://arxiv.org/abs/2406.11617"),
    ("della_linear", "della_magprune", False, False, True, "https://arxiv.org/abs/2406.11617"),
]


def gta_methods() -> list[Method]:
    out = []
    for name, sparsifier, consensus, normalize, rescale, ref in _TABLE:
        spec = MethodSpec(name=name, params=_gta_params(sparsifier, consensus, normalize, rescale, name),
                          needs_base=True, min_inputs=1, reference=ref)
        # scratch: task vectors, keys/masks and the weighted copy ~ 3 fp32 copies of the expert stack
        out.append(GeneralizedTaskArithmetic(spec=spec, scratch_factor=3.0, sparsifier=sparsifier,
                                             consensus=consensus))
    return out
