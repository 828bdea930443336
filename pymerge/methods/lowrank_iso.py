"""Iso-C and Iso-CTS, isotropic merging (Marczak et al., "No Task Left Behind", ICML 2025), as FusionBench's
``iso_c`` / ``iso_cts`` compute them. Per 2-D tensor, tau_t = theta_t - theta_0, r = min(m, n):

Iso-C:   M = sum_t tau_t = U S V^T,  delta = mean(S) U V^T
Iso-CTS: c = int(r * common_space_fraction); c = r - round((r - c) / T) * T  (Python round: half to even);
         d = int((r - c) / T)
         U_c S_c V_c^T = top-c SVD of M                      (common subspace)
         R_t = tau_t - U_c U_c^T tau_t = U'_t S'_t V'_t^T    (task-specific residuals), keep the top d of each
         U = polar([U'_1[:, :d] ... U'_T[:, :d]  U_c]),  V^T = polar([V'_1^T[:d]; ...; V_c^T])
         delta = mean([S'_1[:d] ... S'_T[:d]  S_c]) U V^T     (the mean runs over all r values)
theta = theta_0 + scaling_factor * delta. Other tensors: theta_0 + scaling_factor * mean_t(tau_t).
Both need the whole spectrum of M, so they always use the exact (float64) SVD.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Chunk, MethodSpec, ParamSpec
from .lowrank import SCRATCH_FACTOR, LowRankMerge, LowRankMethod, expert_sum, polar64, truncated_svd64

REFERENCE = "https://arxiv.org/abs/2502.04959; fusion_bench/method/isotropic_merging/iso_utils.py"


def iso_cts_dims(r: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common dims c, dims per task d) exactly as the reference rounds them."""
    c = int(r * fraction)
    c = r - round((r - c) / tasks) * tasks
    return c, int((r - c) / tasks)


class _IsoCMerge(LowRankMerge):
    method_name = "iso_c"

    def __init__(self, job):
        self.scale = float(job.params["scaling_factor"])
        super().__init__(job)

    def setup_matrix(self, m: int, n: int) -> None:
        pass  # exact only: one SVD of the sum

    def sources(self, chunk: Chunk) -> list[torch.Tensor]:
        return [expert_sum(chunk, self.experts, self.base)]

    def dense(self, mats: list[torch.Tensor]) -> torch.Tensor:
        u, s, vh = truncated_svd64(mats[0])
        return (u * s.mean()) @ vh


class _IsoCTSMerge(LowRankMerge):
    method_name = "iso_cts"

    def __init__(self, job):
        self.scale = float(job.params["scaling_factor"])
        self.fraction = float(job.params["common_space_fraction"])
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"iso_cts: common_space_fraction must be in [0, 1], got {self.fraction}")
        super().__init__(job)

    def setup_matrix(self, m: int, n: int) -> None:
        self.c, self.d = iso_cts_dims(min(m, n), len(self.experts), self.fraction)
        if self.c < 0:
            raise ConfigError(f"iso_cts: tensor '{self.job.name}' ({m}x{n}): common_space_fraction "
                              f"{self.fraction} leaves {self.c} common dimensions for {len(self.experts)} tasks; "
                              "raise it")

    def sources(self, chunk: Chunk) -> list[torch.Tensor]:
        data = chunk.data
        return [data[e] - data[self.base] for e in self.experts]

    def dense(self, mats: list[torch.Tensor]) -> torch.Tensor:
        taus = [a.to(torch.float64) for a in mats]
        total = taus[0]
        for tau in taus[1:]:
            total = total + tau
        u_c, s_c, vh_c = truncated_svd64(total, self.c)
        us, ss, vhs = [], [], []
        for tau in taus:
            u, s, vh = truncated_svd64(tau - u_c @ (u_c.T @ tau), self.d)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
        u_all = polar64(torch.cat(us + [u_c], dim=1))
        vh_all = polar64(torch.cat(vhs + [vh_c], dim=0))
        s_mean = torch.cat(ss + [s_c]).mean()
        return (u_all * s_mean) @ vh_all


def methods() -> list:
    scaling = ParamSpec("scaling_factor", float, default=1.0, doc="scale of the merged task vector (alpha)")
    iso_c = MethodSpec(name="iso_c", params=(scaling,), needs_base=True, min_inputs=2, reference=REFERENCE,
                       doc="Iso-C: the summed task vector with a flat (mean) singular spectrum")
    iso_cts = MethodSpec(
        name="iso_cts",
        params=(scaling, ParamSpec("common_space_fraction", float, default=0.8,
                                   doc="share of the spectrum taken from the summed task vector")),
        needs_base=True, min_inputs=2, reference=REFERENCE,
        doc="Iso-CTS: common subspace of the sum plus per-task residual subspaces, flat spectrum")
    return [LowRankMethod(spec=iso_c, scratch_factor=SCRATCH_FACTOR, extra={"merge_cls": _IsoCMerge}),
            LowRankMethod(spec=iso_cts, scratch_factor=SCRATCH_FACTOR, extra={"merge_cls": _IsoCTSMerge})]
