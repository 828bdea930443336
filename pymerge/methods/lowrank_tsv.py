"""TSV-M, Task Singular Vectors Merge (Gargiulo et al., CVPR 2025), as FusionBench's
``compute_and_sum_svd_mem_reduction`` computes it. Per 2-D tensor of T task vectors, r = min(m, n),
k = int(r * (1 / T)):

    tau_t = w_t (theta_t - theta_0) = U_t S_t V_t^T            (w_t: the reference's per-task alpha list)
    U_c = [U_1[:, :k] ... U_T[:, :k]]  [m, Tk],  S_c = [S_1[:k] ... S_T[:k]],  V_c^T = [V_1^T[:k]; ...]  [Tk, n]
    delta = polar(U_c) diag(S_c) polar(V_c^T),   polar(X) = P Q^T for X = P Sigma Q^T
    theta = theta_0 + alpha * delta
Other tensors: theta_0 + alpha * mean_t(tau_t). k = 0 (r < T) gives delta = 0, as in the reference.
The per-task SVDs are exact (float64) unless ``svd_mode`` picks the streamed randomized SVD (auto: when
3 (k + 10) < r, i.e. many tasks).
"""

from __future__ import annotations

import torch

from .base import Chunk, MethodSpec, ParamSpec
from .lowrank import (SCRATCH_FACTOR, SVD_MODE_PARAM, LowRankMerge, LowRankMethod, expert_sum, polar64,
                      truncated_svd64, use_randomized)


def tsv_combine(svds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int):
    """(L, R) with delta = L @ R from per-task top-k triplets: L = polar(U_c) diag(S_c), R = polar(V_c^T)
    (float64)."""
    u_c = torch.cat([u[:, :k].to(torch.float64) for u, _, _ in svds], dim=1)
    s_c = torch.cat([s[:k].to(torch.float64) for _, s, _ in svds])
    v_c = torch.cat([vh[:k].to(torch.float64) for _, _, vh in svds], dim=0)
    return polar64(u_c) * s_c, polar64(v_c)


class _TSVMerge(LowRankMerge):
    method_name = "tsv_m"

    def __init__(self, job):
        self.weights = [float(job.model_params[e]["weight"]) for e in job.expert_indices]
        self.scale = float(job.params["alpha"])
        super().__init__(job)

    def setup_matrix(self, m: int, n: int) -> None:
        t = len(self.experts)
        self.k = int(min(m, n) * (1 / t))  # the reference's int(r * sv_reduction), sv_reduction = 1 / T
        self.randomized = use_randomized(self.job.params["svd_mode"], self.k, (m, n), self.job.name, "tsv_m")
        self.ranks = [self.k] * t

    def sources(self, chunk: Chunk) -> list[torch.Tensor]:
        data = chunk.data
        return [(data[e] - data[self.base]) * w for e, w in zip(self.experts, self.weights)]

    def dense(self, mats: list[torch.Tensor]) -> torch.Tensor:
        if self.k == 0:
            return torch.zeros(self.job.shape, dtype=torch.float64, device=mats[0].device)
        left, right = tsv_combine([truncated_svd64(a, self.k) for a in mats], self.k)
        return left @ right

    def factors(self, svds):
        left, right = tsv_combine(svds, self.k)
        return left.to(torch.float32), right.to(torch.float32)

    def vector_delta(self, chunk: Chunk) -> torch.Tensor:
        return expert_sum(chunk, self.experts, self.base, self.weights) / len(self.experts)


def methods() -> list:
    spec = MethodSpec(
        name="tsv_m",
        params=(
            ParamSpec("alpha", float, default=1.0, doc="scale of the merged task vector (reference: float alpha)"),
            ParamSpec("weight", float, default=1.0, per_model=True,
                      doc="scales this model's task vector before its SVD (reference: the list form of alpha)"),
            SVD_MODE_PARAM,
        ),
        needs_base=True, min_inputs=2,
        reference="https://arxiv.org/abs/2412.00081; fusion_bench/method/task_singular_vector/utils/TSVM_utils.py",
        doc="Task Singular Vectors Merge: per-task top-r/T SVDs, decorrelated by polar factors",
    )
    return [LowRankMethod(spec=spec, scratch_factor=SCRATCH_FACTOR, extra={"merge_cls": _TSVMerge})]
