"""STAR and CART: per-task low-rank truncations of task vectors, then a sum.

STAR, Spectral Truncation And Rescale (Lee et al., NAACL 2025; IBM/STAR merger/STAR.py + runner's average).
Per 2-D tensor and task, tau_t = theta_t - theta_0 = U S V^T:
    r_t = (number of i with cumsum(S)_i < eta/100 * sum(S)) + 1     (searchsorted, left side, + 1)
    tau~_t = U[:, :r_t] diag(S[:r_t] * sum(S) / sum(S[:r_t])) V^T[:r_t]
    theta = theta_0 + mean_t tau~_t
With ``known_rank`` (the LoRA rank) the SVD is the randomized rank-known_rank one (the reference's
torch.svd_lowrank(q = known_rank + 5), 2 power iterations) and sum(S) runs over those values only.
A zero task vector contributes zero (the reference divides 0 by 0). Other tensors: mean of task vectors.

CART, centred arithmetic with rank-reduced task vectors (Choi et al., arXiv 2412.12153; JH-GEECS/CART
src/merging.py, merge_method CART). theta_bar = theta_0 + mean_t tau_t (the average model):
    delta_t = theta_t - theta_bar,   k = max(1, int(rank_ratio * min(m, n)))  (0 -> nothing, 1.0 -> full)
    theta = theta_bar + prior * sum_t LowRank_k(delta_t)
for 2-D tensors whose name contains 'attn' or 'mlp' and neither 'ln' nor 'bias' (the reference's filter);
every other tensor is theta_bar (the reference adds prior * sum_t delta_t there, which is zero up to rounding).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Chunk, MethodSpec, ParamSpec
from .lowrank import (SCRATCH_FACTOR, SVD_MODE_PARAM, LowRankMerge, LowRankMethod, expert_sum, truncated_svd64,
                      use_randomized)


def star_truncate(s: torch.Tensor, eta: float) -> tuple[int, torch.Tensor]:
    """(r, rescaled top-r singular values): the smallest prefix holding eta% of the nuclear norm, rescaled to
    the full nuclear norm. (0, empty) for an all-zero spectrum."""
    s = s.to(torch.float64)
    total = s.sum()
    if not bool(total > 0):
        return 0, s[:0]
    cums = torch.cumsum(s, dim=0)
    r = int(torch.searchsorted(cums, total * eta / 100).item()) + 1
    kept = s[:r]
    return kept.shape[0], kept * (total / kept.sum())


class _StarMerge(LowRankMerge):
    method_name = "star"

    def __init__(self, job):
        self.eta = float(job.params["eta"])
        self.known_rank = job.params.get("known_rank")
        super().__init__(job)

    def setup_matrix(self, m: int, n: int) -> None:
        if self.known_rank is not None:
            if int(self.known_rank) < 1:
                raise ConfigError(f"star: known_rank must be >= 1, got {self.known_rank}")
            self.randomized = True
            self.oversample = 5  # the reference's q = known_rank + 5
            self.ranks = [min(int(self.known_rank), m, n)] * len(self.experts)

    def sources(self, chunk: Chunk) -> list[torch.Tensor]:
        data = chunk.data
        return [data[e] - data[self.base] for e in self.experts]

    def _terms(self, svds):
        """(L, R) factors of mean_t tau~_t, float64."""
        lefts, rights = [], []
        for u, s, vh in svds:
            r, s_new = star_truncate(s, self.eta)
            lefts.append(u[:, :r].to(torch.float64) * (s_new / len(svds)))
            rights.append(vh[:r].to(torch.float64))
        return torch.cat(lefts, dim=1), torch.cat(rights, dim=0)

    def dense(self, mats: list[torch.Tensor]) -> torch.Tensor:
        left, right = self._terms([truncated_svd64(a) for a in mats])
        return left @ right

    def factors(self, svds):
        left, right = self._terms(svds)
        return left.to(torch.float32), right.to(torch.float32)


def cart_rank(ratio: float, r: int) -> int:
    """The reference's parsed_dim: 0 for ratio 0 (all zero), r for 1.0, else max(1, int(ratio * r))."""
    if ratio == 0.0:
        return 0
    if ratio == 1.0:
        return r
    return min(r, max(1, int(ratio * r)))


def cart_filter(name: str) -> bool:
    """The reference's choice of tensors that get the low-rank treatment."""
    return ("attn" in name or "mlp" in name) and not ("ln" in name or "bias" in name)


class _CartMerge(LowRankMerge):
    method_name = "cart"

    def __init__(self, job):
        self.scale = float(job.params["prior"])
        self.ratio = float(job.params["rank_ratio"])
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"cart: rank_ratio must be in [0, 1], got {self.ratio}")
        super().__init__(job)

    def svd_applies(self) -> bool:
        return cart_filter(self.job.name)

    def setup_matrix(self, m: int, n: int) -> None:
        self.k = cart_rank(self.ratio, min(m, n))
        self.randomized = use_randomized(self.job.params["svd_mode"], self.k, (m, n), self.job.name, "cart")
        self.ranks = [self.k] * len(self.experts)

    def anchor(self, chunk: Chunk) -> torch.Tensor:
        """theta_bar rows: theta_0 + mean_t tau_t."""
        return chunk.data[self.base] + expert_sum(chunk, self.experts, self.base) / len(self.experts)

    def vector_delta(self, chunk: Chunk) -> torch.Tensor:
        return torch.zeros_like(chunk.data[self.base])

    def sources(self, chunk: Chunk) -> list[torch.Tensor]:
        avg = self.anchor(chunk)
        return [chunk.data[e] - avg for e in self.experts]

    def dense(self, mats: list[torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(self.job.shape, dtype=torch.float64, device=mats[0].device)
        if self.k == 0:
            return total
        for a in mats:
            u, s, vh = truncated_svd64(a, self.k)
            total += (u * s) @ vh
        return total

    def factors(self, svds):
        left = torch.cat([u * s for u, s, _ in svds], dim=1)
        right = torch.cat([vh for _, _, vh in svds], dim=0)
        return left, right


def methods() -> list:
    star = MethodSpec(
        name="star",
        params=(ParamSpec("eta", float, default=40.0, doc="percent of the nuclear norm kept per task vector"),
                ParamSpec("known_rank", int, default=None,
                          doc="rank of the task vectors if known (LoRA): randomized rank-known_rank SVD")),
        needs_base=True, min_inputs=2,
        reference="Lee et al., NAACL 2025; https://github.com/IBM/STAR merger/STAR.py",
        doc="STAR: truncate each task vector to eta% of its nuclear norm, rescale, average")
    cart = MethodSpec(
        name="cart",
        params=(ParamSpec("prior", float, default=2.0, doc="scale of the summed low-rank deviations (lambda)"),
                ParamSpec("rank_ratio", float, default=0.12,
                          doc="kept rank as a fraction of min(m, n) (reference: initial_rank_ratio)"),
                SVD_MODE_PARAM),
        needs_base=True, min_inputs=2,
        reference="https://arxiv.org/abs/2412.12153; JH-GEECS/CART src/merging.py",
        doc="CART: average model plus the sum of rank-reduced deviations from it")
    return [LowRankMethod(spec=star, scratch_factor=SCRATCH_FACTOR, extra={"merge_cls": _StarMerge}),
            LowRankMethod(spec=cart, scratch_factor=SCRATCH_FACTOR, extra={"merge_cls": _CartMerge})]
