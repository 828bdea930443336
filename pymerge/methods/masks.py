"""Mask-based methods: TALL masks and Consensus merging (Wang et al., ICML 2024), EMR-Merging (Huang et al.,
NeurIPS 2024), MMER (Li, Du et al., ACL 2025). The math is in ``masks_math.py``; docs in docs/methods/masks.md.

These methods define one shared task vector plus per-task binary masks (and rescalers). As merge methods they
write one model:
  consensus    theta_0 + scaling_coef * (m_cons * tau_MTL),  m_cons = 1[sum_t m_t >= prun_thre_k]
  tall_masks   theta_0 + tau_MTL          (unscaled: the model the TALL masks are applied to)
  emr          theta_0 + tau_uni          (the unified model EMR's masks and rescalers modulate)
  mmer         theta_0 + tau_*            (the merged LLM that MMER's modality masks decouple)
``pymerge.masks.build_task_masks`` writes the per-task masks of tall_masks/emr/mmer from the same config, and
``apply_task_mask`` rebuilds task t as theta_0 + r_t * m_t * (merged - theta_0).

Parameter names follow the references: nik-dim/tall_masks (``tall_mask_lambda``, ``prun_thre_k``, ``k``,
``use_ties``; ``scaling_coef`` is the alpha its evaluation searches) and the MMER paper (``alpha``, ``lambda``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import ConfigError
from . import masks_math as mm
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


class Decomposition(NamedTuple):
    """One chunk split the way the mask methods see it (all [T, rows, n] but ``shared``)."""

    tau: torch.Tensor  # task vectors, fp32
    shared: torch.Tensor  # tau_MTL / tau_uni / tau_* of the chunk, [rows, n]
    masks: torch.Tensor  # bool, one per task


_LAMBDA = ParamSpec("tall_mask_lambda", float, default=0.6, per_model=True,
                    doc="lambda_t of the task's TALL mask |tau_t| > lambda_t |tau_MTL - tau_t| (FusionBench "
                        "default 0.6; the reference picks it per task from 0.2..0.6 on validation data)")
_K = ParamSpec("k", float, default=None,
               doc="top-k of each task vector kept (model-wide, ties kept) before building tau_MTL: a percentage "
                   "if >= 1, a fraction if < 1, 100 = no trimming; default 100, or 20 with use_ties")
_USE_TIES = ParamSpec("use_ties", bool, default=False,
                      doc="build tau_MTL with TIES (top-k, sign election, disjoint sum) instead of a plain sum")


def _tall_params(consensus: bool) -> tuple[ParamSpec, ...]:
    params = [_LAMBDA, _K, _USE_TIES]
    if consensus:
        params += [ParamSpec("prun_thre_k", int, default=2,
                             doc="keep an element where at least this many TALL masks are on (2 drops "
                                 "catastrophic and selfish weights, 0 gives TA/TIES back)"),
                   ParamSpec("scaling_coef", float, default=1.0,
                             doc="alpha, the scale of the consensus-masked tau_MTL (the reference searches it "
                                 "over (0, 1] on validation data)")]
    return tuple(params)


_MMER_PARAMS = (
    ParamSpec("alpha", float, default=1.0,
              doc="mask threshold: m_t = |tau_t| > alpha |tau_* - tau_t| (1 = the L1-optimal mask)"),
    ParamSpec("lambda", float, default=1.0,
              doc="scale of the masked tau_* when a modality's model is rebuilt (stored as its rescaler)"),
)


class _MaskMerge(TensorMerge):
    """One tensor of a mask method: ``decompose`` for the mask builder, ``map`` for the merged model."""

    reduce_passes = 0

    def __init__(self, method: "MaskMethod", job: TensorJob):
        name = method.spec.name
        if job.base_index is None:
            raise ConfigError(f"{name} needs a base_model")
        self.job, self.kind = job, method.kind
        p = job.params
        self.lambdas: list[float] = []
        if self.kind in ("tall_masks", "consensus"):
            self.use_ties = bool(p["use_ties"])
            k = mm.resolved_k(p)
            mm.check_k(k, f"{name}, tensor '{job.name}'")
            if mm.pass_kinds(k, self.use_ties) and not isinstance(job.global_state, mm.GlobalTrim):
                raise ConfigError(f"{name}: tensor '{job.name}' has no model-wide statistics (k={k}, "
                                  f"use_ties={self.use_ties} need the global passes)")
            self.trim = job.global_state if isinstance(job.global_state, mm.GlobalTrim) else None
            self.lambdas = [float(job.model_params[i]["tall_mask_lambda"]) for i in job.expert_indices]
            if self.kind == "consensus":
                self.prun_thre_k = int(p["prun_thre_k"])
                self.alpha = float(p["scaling_coef"])
                if self.prun_thre_k < 0:
                    raise ConfigError(f"{name}: prun_thre_k must be >= 0, got {self.prun_thre_k}")
        elif self.kind == "mmer":
            self.lambdas = [float(p["alpha"])] * len(job.expert_indices)
        for lam in self.lambdas:
            if lam < 0:
                raise ConfigError(f"{name}, tensor '{job.name}': mask thresholds must be >= 0, got {lam}")

    def shared(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(shared vector, EMR's masks or None) of a chunk's task vectors."""
        if self.kind in ("tall_masks", "consensus"):
            return mm.multitask_vector(tau, self.trim, self.use_ties), None
        return mm.emr_unified(tau)

    def decompose(self, chunk: Chunk) -> Decomposition:
        """Task vectors, shared vector and per-task masks of one chunk."""
        tau = mm.task_vectors(self.job, chunk)
        shared, masks = self.shared(tau)
        if masks is None or self.kind == "mmer":
            masks = mm.tall_masks(tau, shared, self.lambdas)
        return Decomposition(tau, shared, masks)

    def map(self, chunk: Chunk) -> torch.Tensor:
        base = chunk.data[self.job.base_index]
        if not self.job.expert_indices:
            return base.clone()
        if self.kind == "consensus":
            d = self.decompose(chunk)
            count = d.masks.sum(dim=0, dtype=torch.int32)
            kept = torch.where(count >= self.prun_thre_k, d.shared, torch.zeros((), dtype=d.shared.dtype))
            return base + (kept * self.alpha if self.alpha != 1 else kept)
        shared, _ = self.shared(mm.task_vectors(self.job, chunk))
        return base + shared


@dataclass
class MaskMethod(Method):
    kind: str = ""

    def start(self, job: TensorJob) -> TensorMerge:
        return _MaskMerge(self, job)

    # --- tall_masks / consensus: model-wide top-k and TIES majority sign ---
    def global_passes(self, params: dict) -> int:
        if self.kind not in ("tall_masks", "consensus"):
            return 0
        k = mm.resolved_k(params)
        mm.check_k(k, self.spec.name)
        return len(mm.pass_kinds(k, bool(params["use_ties"])))

    def global_init(self, jobs: list[TensorJob]) -> mm.GlobalTrim:
        return mm.global_init(jobs, self.spec.name)

    def global_reduce(self, state: mm.GlobalTrim, p: int, job: TensorJob, chunk: Chunk) -> None:
        mm.global_reduce(state, p, job, chunk)

    def global_end_pass(self, state: mm.GlobalTrim, p: int) -> mm.GlobalTrim:
        return mm.global_end_pass(state, p)


_TALL_REF = "https://arxiv.org/abs/2405.07813 (nik-dim/tall_masks src/utils/tallmask_utils.py)"
_TABLE = [
    # name, parameters, reference, doc
    ("consensus", _tall_params(True), _TALL_REF, "Consensus merging: TA/TIES vector restricted to weights that at "
                                                 "least prun_thre_k TALL masks select"),
    ("tall_masks", _tall_params(False), _TALL_REF, "theta_0 + tau_MTL; per-task TALL masks via pymerge masks build"),
    ("emr", (), "https://arxiv.org/abs/2405.17461 (harveyhuang18/EMR_Merging merge_vit/src/main_emr_merging.py)",
     "theta_0 + tau_uni; per-task masks and rescalers via pymerge masks build"),
    ("mmer", _MMER_PARAMS, "https://arxiv.org/abs/2505.17110 (paper only; see docs/methods/masks.md)",
     "theta_0 + tau_*; per-modality L1-optimal masks via pymerge masks build"),
]


def methods() -> list[Method]:
    # scratch: task vectors, their trimmed copy, |.| temporaries and masks ~ 4 fp32 copies of the expert stack
    return [MaskMethod(spec=MethodSpec(name=name, params=params, needs_base=True, min_inputs=2, reference=ref,
                                       doc=doc), scratch_factor=4.0, kind=name)
            for name, params, ref, doc in _TABLE]
