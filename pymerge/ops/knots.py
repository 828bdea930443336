"""KnOTS (Stoica et al., ICLR 2025): align task updates in one shared SVD basis, merge their coordinates.

    [ΔW_1 | … | ΔW_T] = U diag(S) [V_1ᵀ | … | V_Tᵀ]    (m × T·n, float64; components with S ≤ eps dropped)
    V_mᵀ = elementwise_merge(V_1ᵀ, …, V_Tᵀ)            (TIES / DARE-TIES / task arithmetic on the k × n blocks)
    ΔW_m = λ · U diag(S) V_mᵀ

From LoRA factors (ΔW_t = s_t B_t A_t) the SVD never touches an m × T·n matrix: with B_cat = [B_1 … B_T] = Q_B R_B
and A_tᵀ = Q_t R_t (thin QR),

    [ΔW_1 | … | ΔW_T] = Q_B · (R_B · blockdiag(s_t R_tᵀ)) · blockdiag(Q_tᵀ)

so one SVD of the (Σ r_t)² core C = U_c S V_cᵀ gives U = Q_B U_c and V_tᵀ = (V_cᵀ)[:, block t] Q_tᵀ: exact, and
O((m + n) (Σ r_t)²) work. ``knots_align_dense`` is the plain SVD for full task vectors.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError

F64 = torch.float64
ELEMENT_MERGES = ("ties", "dare_ties", "task_arithmetic")
DEFAULT_EPS = 1e-4  # the reference keeps singular values > 1e-4 (absolute, fp64)

Factors = tuple[torch.Tensor, torch.Tensor, float]  # (A [r, n], B [m, r], s): ΔW = s · B @ A


def knots_align(factors: Sequence[Factors], *, eps: float = DEFAULT_EPS
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(U [m, k], S [k], [V_tᵀ [k, n]]) with [s_1 B_1 A_1 | … | s_T B_T A_T] = U diag(S) [V_1ᵀ … V_Tᵀ], S > eps.

    Computed from the factors by QR (module doc), in float64.
    """
    if not factors:
        raise ConfigError("knots: no LoRA factors given")
    m, n = factors[0][1].shape[0], factors[0][0].shape[1]
    bs, qs, rs = [], [], []
    for t, (a, b, s) in enumerate(factors):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or b.shape[0] != m or a.shape[1] != n:
            raise ConfigError(f"knots: factors of task {t} have shapes A {list(a.shape)}, B {list(b.shape)}; "
                              f"expected A [r, {n}] and B [{m}, r]")
        q, r = torch.linalg.qr(a.to(F64).T, mode="reduced")  # A_tᵀ = Q_t R_t: Q_t [n, r_t]
        qs.append(q)
        rs.append(float(s) * r.T)  # s_t R_tᵀ [r_t, r_t]
        bs.append(b.to(F64))
    q_b, r_b = torch.linalg.qr(torch.cat(bs, dim=1), mode="reduced")  # [m, Σr], [Σr, Σr] (m < Σr: [m, m], [m, Σr])
    core = r_b @ torch.block_diag(*rs)
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    keep = s > eps
    u = q_b @ u_c[:, keep]
    vh_c = vh_c[keep]
    vhs, col = [], 0
    for q in qs:
        vhs.append(vh_c[:, col:col + q.shape[1]] @ q.T)
        col += q.shape[1]
    return u, s[keep], vhs


def knots_align_dense(deltas: Sequence[torch.Tensor], *, eps: float = DEFAULT_EPS
                      ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(U, S, [V_tᵀ]) from the float64 SVD of [ΔW_1 | … | ΔW_T] itself (full fine-tunes; m × T·n work)."""
    if not deltas:
        raise ConfigError("knots: no task vectors given")
    shape = tuple(deltas[0].shape)
    for t, d in enumerate(deltas):
        if d.dim() != 2 or tuple(d.shape) != shape:
            raise ConfigError(f"knots: task vector {t} has shape {list(d.shape)}, expected 2-D {list(shape)}")
    u, s, vh = torch.linalg.svd(torch.cat([d.to(F64) for d in deltas], dim=1), full_matrices=False)
    keep = s > eps
    return u[:, keep], s[keep], list(torch.split(vh[keep], shape[1], dim=1))


def merge_aligned(u: torch.Tensor, s: torch.Tensor, vhs: Sequence[torch.Tensor], *, merge: str = "ties",
                  weights: Sequence[float] | None = None, densities: Sequence[float] | None = None,
                  consensus_method: str = "sum", lambda_: float = 1.0, seed: int = 0, name: str = "tensor",
                  model_ids: Sequence[int] | None = None) -> torch.Tensor:
    """λ · U diag(S) V_mᵀ (float64) where V_mᵀ merges the V_tᵀ blocks elementwise with ``merge``.

    ``merge``: "ties" (trim to ``densities``, elect signs, disjoint mean), "dare_ties" (random drop + rescale,
    elect, sum) or "task_arithmetic" (weighted sum), each as ``pymerge.ops.merge_tensors`` computes it (fp32)
    with the blocks as task vectors over a zero base. ``model_ids`` key DARE's random streams per task.
    """
    from . import merge_tensors  # the package imports this module's users lazily; avoid an import cycle

    if merge not in ELEMENT_MERGES:
        raise ConfigError(f"knots: merge must be one of {', '.join(ELEMENT_MERGES)}, got {merge!r}")
    T = len(vhs)
    weights = [1.0] * T if weights is None else [float(w) for w in weights]
    densities = [1.0] * T if densities is None else [float(d) for d in densities]
    if len(weights) != T or len(densities) != T:
        raise ConfigError(f"knots: {T} tasks but {len(weights)} weights and {len(densities)} densities")
    k = u.shape[1]
    if k == 0:  # nothing above eps: every task update is (numerically) zero
        return torch.zeros(u.shape[0], vhs[0].shape[1] if vhs else 0, dtype=F64)
    params: dict = {"lambda": 1.0}
    per_task = [{"weight": w} for w in weights]
    if merge != "task_arithmetic":
        per_task = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
        params["consensus_method"] = consensus_method
    ids = [0] + [int(i) + 1 for i in (model_ids if model_ids is not None else range(T))]
    vm = merge_tensors(merge, [torch.zeros_like(vhs[0], dtype=torch.float32), *[v.float() for v in vhs]],
                       base_index=0, params=params, model_params=[{}] + per_task, seed=seed, name=name,
                       model_ids=ids)
    return float(lambda_) * (u * s) @ vm.to(F64)


def knots_merge(factors: Sequence[Factors], *, merge: str = "ties", weights: Sequence[float] | None = None,
                densities: Sequence[float] | None = None, consensus_method: str = "sum", lambda_: float = 1.0,
                eps: float = DEFAULT_EPS, seed: int = 0, name: str = "tensor") -> torch.Tensor:
    """ΔW_m = λ · U diag(S) V_mᵀ of KnOTS over LoRA factors (see module doc); fp32 [m, n].

    ``factors``: one (A [r_t, n], B [m, r_t], s_t) per task, ΔW_t = s_t · B_t @ A_t (ranks may differ).
    """
    u, s, vhs = knots_align(factors, eps=eps)
    return merge_aligned(u, s, vhs, merge=merge, weights=weights, densities=densities,
                         consensus_method=consensus_method, lambda_=lambda_, seed=seed, name=name).float()


__all__ = ["knots_align", "knots_align_dense", "merge_aligned", "knots_merge", "ELEMENT_MERGES", "DEFAULT_EPS"]
