"""KnOTS: the LoRA-factor alignment (QR route), the merge against a float64 numpy oracle, and the file method.

The oracle takes the plain float64 numpy SVD of [ΔW_1 | … | ΔW_T] (the reference's definition), drops S ≤ 1e-4,
and merges the V_tᵀ blocks with the float64 TIES oracle of tests/methods/reference.py. SVD signs are arbitrary
per component, but flipping u_i and row i of every V_tᵀ flips TIES' elected signs and kept values with it, so
U S V_mᵀ does not depend on them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pymerge.errors import ConfigError
from pymerge.ops import merge_tensors
from pymerge.ops.knots import knots_align, knots_align_dense, knots_merge, merge_aligned

from . import reference as ref

F64 = torch.float64


def _factors(m: int, n: int, ranks, seed: int):
    g = torch.Generator().manual_seed(seed)
    scales = [0.7, 1.3, 2.0, 0.5][: len(ranks)]
    return [(torch.randn(r, n, generator=g, dtype=F64) * 0.3, torch.randn(m, r, generator=g, dtype=F64) * 0.3, s)
            for r, s in zip(ranks, scales)]


def _dense(factors):
    return [s * b @ a for a, b, s in factors]


def _oracle(deltas, merge: str, weights, densities, lam: float, eps: float = 1e-4) -> np.ndarray:
    """λ U S V_mᵀ with numpy's SVD and the reference's float64 TIES / task arithmetic on the V blocks."""
    n = deltas[0].shape[1]
    u, s, vh = np.linalg.svd(np.concatenate([d.numpy() for d in deltas], axis=1), full_matrices=False)
    keep = s > eps
    u, s, vh = u[:, keep], s[keep], vh[keep]
    vhs = [torch.from_numpy(vh[:, t * n:(t + 1) * n].copy()) for t in range(len(deltas))]
    zero = torch.zeros_like(vhs[0])
    if merge == "ties":
        keeps = [ref.magnitude_keep(v, d) for v, d in zip(vhs, densities)]
        vm = ref.gta(zero, vhs, weights, keeps=keeps, consensus="sum", normalize=True).value
    else:
        vm = ref.gta(zero, vhs, weights).value
    return lam * (u * s) @ vm.numpy()


SHAPES = [(19, 23, (3, 2, 4)), (5, 23, (3, 4)), (17, 2, (3, 1, 2))]  # plain; m < Σr; n < r_t


@pytest.mark.parametrize("m, n, ranks", SHAPES)
def test_alignment_from_factors_is_the_svd_of_the_concatenation(m, n, ranks):
    factors = _factors(m, n, ranks, seed=m + n)
    deltas = _dense(factors)
    u, s, vhs = knots_align(factors)
    concat = torch.cat(deltas, dim=1)
    torch.testing.assert_close((u * s) @ torch.cat(vhs, dim=1), concat, rtol=0, atol=1e-12)
    k = s.numel()
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    vh = torch.cat(vhs, dim=1)
    torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=F64), rtol=0, atol=1e-12)
    s_np = np.linalg.svd(concat.numpy(), compute_uv=False)
    np.testing.assert_allclose(s.numpy(), s_np[s_np > 1e-4], rtol=1e-12)
    assert k == min(m, sum(min(r, n) for r in ranks))
    # the dense route (full fine-tunes) gives the same factorisation
    ud, sd, vhd = knots_align_dense(deltas)
    torch.testing.assert_close(sd, s, rtol=1e-12, atol=0)
    for t in range(len(deltas)):
        torch.testing.assert_close((ud * sd) @ vhd[t], deltas[t], rtol=0, atol=1e-12)


@pytest.mark.parametrize("m, n, ranks", SHAPES)
@pytest.mark.parametrize("density", [0.35, 1.0])
def test_knots_ties_matches_float64_oracle(m, n, ranks, density):
    factors = _factors(m, n, ranks, seed=3 * m + n)
    weights = [1.0, 0.6, 1.4, 0.8][: len(ranks)]
    densities = [density, 0.5, 0.8, 1.0][: len(ranks)]
    ours = knots_merge(factors, merge="ties", weights=weights, densities=densities, lambda_=0.9)
    want = _oracle(_dense(factors), "ties", weights, densities, 0.9)
    assert ours.dtype == torch.float32 and tuple(ours.shape) == (m, n)
    # the blocks are merged in fp32 (pymerge's TIES): a few fp32 roundings of O(max|ΔW|) terms
    np.testing.assert_allclose(ours.double().numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.abs(want).max() > 0.1


def test_knots_task_arithmetic_is_the_weighted_sum_of_updates():
    factors = _factors(19, 23, (3, 2, 4), seed=5)
    w = [0.5, -1.0, 2.0]
    ours = knots_merge(factors, merge="task_arithmetic", weights=w, lambda_=1.5)
    want = 1.5 * sum(wt * d for wt, d in zip(w, _dense(factors)))
    np.testing.assert_allclose(ours.double().numpy(), want.numpy(), rtol=0, atol=1e-5 * float(want.abs().max()))
    np.testing.assert_allclose(_oracle(_dense(factors), "ta", w, None, 1.5), want.numpy(), rtol=0, atol=1e-12)


def test_ties_really_differs_from_the_sum():
    factors = _factors(19, 23, (3, 2, 4), seed=5)
    ties = knots_merge(factors, merge="ties", densities=[0.3] * 3)
    ta = knots_merge(factors, merge="task_arithmetic")
    assert (ties - ta).abs().max() > 0.05


def test_dare_ties_is_seeded_and_runs():
    factors = _factors(19, 23, (3, 2, 4), seed=6)
    a = knots_merge(factors, merge="dare_ties", densities=[0.5] * 3, seed=1)
    b = knots_merge(factors, merge="dare_ties", densities=[0.5] * 3, seed=1)
    c = knots_merge(factors, merge="dare_ties", densities=[0.5] * 3, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_zero_updates_and_bad_input():
    zero = [(torch.zeros(2, 7, dtype=F64), torch.zeros(5, 2, dtype=F64), 1.0)] * 2
    assert torch.equal(knots_merge(zero), torch.zeros(5, 7))
    with pytest.raises(ConfigError, match="merge must be one of"):
        knots_merge(_factors(5, 7, (2, 2), 0), merge="slerp")
    with pytest.raises(ConfigError, match=r"task 1 .*expected A \[r, 7\]"):
        knots_align([(torch.zeros(2, 7), torch.zeros(5, 2), 1.0), (torch.zeros(2, 6), torch.zeros(5, 2), 1.0)])
    u, s, vhs = knots_align(_factors(5, 7, (2, 2), 0))
    with pytest.raises(ConfigError, match="2 tasks but 1 weights"):
        merge_aligned(u, s, vhs, weights=[1.0])


# ------------------------------------------------------------------------------------- the file-level method


def _family(m: int, n: int, ranks, seed: int):
    g = torch.Generator().manual_seed(seed + 100)
    base = torch.randn(m, n, generator=g)
    factors = _factors(m, n, ranks, seed)
    experts = [base + d.float() for d in _dense(factors)]
    # what the method sees: fp32 experts; their exact task vectors have rank <= r_t plus fp32 rounding noise
    return base, experts, factors


@pytest.mark.parametrize("chunk", [None, 1, 7, 256, 300])
def test_method_matches_factor_route_and_is_chunking_invariant(chunk):
    m, n, ranks = 300, 17, (3, 2, 4)  # > 256 rows: the map's fixed row blocks are crossed by chunks
    base, experts, factors = _family(m, n, ranks, seed=9)
    mp = [{}] + [{"weight": w, "density": d} for w, d in zip([1.0, 0.7, 1.2], [0.5, 0.8, 0.6])]
    params = {"rank": 12, "lambda": 0.8}
    out = merge_tensors("knots", [base, *experts], base_index=0, params=params, model_params=mp, seed=4,
                        max_rows_per_chunk=chunk)
    whole = merge_tensors("knots", [base, *experts], base_index=0, params=params, model_params=mp, seed=4)
    assert torch.equal(out, whole)
    taus = [e.double() - base.double() for e in experts]  # the exact task vectors of the fp32 experts
    want = base.double().numpy() + _oracle(taus, "ties", [1.0, 0.7, 1.2], [0.5, 0.8, 0.6], 0.8)
    np.testing.assert_allclose(out.double().numpy(), want, rtol=0, atol=1e-5 * np.abs(want - base.numpy()).max())


def test_method_vectors_are_averaged_and_untouched_tensors_are_the_base():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(11, generator=g)
    experts = [base + torch.randn(11, generator=g) for _ in range(3)]
    out = merge_tensors("knots", [base, *experts], base_index=0)
    want = base.double() + sum(e.double() - base.double() for e in experts) / 3
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)
    mat = torch.randn(9, 5, generator=g)
    assert torch.equal(merge_tensors("knots", [mat, mat.clone(), mat.clone()], base_index=0), mat)
