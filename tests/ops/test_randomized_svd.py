"""randomized_svd against numpy.linalg.svd (float64 LAPACK) on matrices with known, slowly decaying spectra.

Bounds, and why: with oversampling p = 10 and q = 2 power iterations, Halko-Martinsson-Tropp (2011, Cor. 10.10)
bound the expected spectral error of the rank-k range by ~ (1 + 9 sqrt(k + p) sqrt(min(m, n)))^(1/(2q+1)) sigma_{k+1};
for these sizes that factor is < 3.5, and in practice it is close to 1. We assert
  * residual:  ||A - U S Vh||_2 <= 1.1 sigma_{k+1}   and   ||A - U S Vh||_F <= 1.02 ||A - A_k||_F
    (measured <= 1.053 and <= 1.011 on a 1/sqrt(i) spectrum; without power iterations they are ~1.5-3x)
  * singular values, relative: <= 0.1 for every i <= k and <= 0.01 for i <= k/2 on the slow 1/sqrt(i)
    spectrum (measured 0.068 and 0.0065: the values near k converge slowest, as HMT/Gu's bounds predict);
    <= 1e-5 sigma_1 for the top half of a 1/i spectrum,
  * U, Vh orthonormal to 1e-5 (fp32 factors of an fp64 core),
all measured against numpy's SVD of the same fp32 matrix (the known spectrum is checked to match numpy first).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pymerge.errors import ConfigError, MergeError
from pymerge.ops import randomized_svd as rsvd_module
from pymerge.ops.randomized_svd import (DifferenceRowBlocks, StreamedSVD, TensorRowBlocks, core_svd, orthonormalize,
                                        randomized_svd)


def _known(m: int, n: int, spectrum: np.ndarray, seed: int) -> np.ndarray:
    """A = U diag(s) V^T with Haar-random orthonormal U [m, r], V [n, r] (float64)."""
    rng = np.random.default_rng(seed)
    r = len(spectrum)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return (u * spectrum) @ v.T


def _numpy_svd(a32: torch.Tensor):
    return np.linalg.svd(a32.double().numpy(), full_matrices=False)


SHAPES = [(301, 157), (157, 301), (513, 255)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rank", [1, 7, 40])
def test_slow_decay_against_numpy(shape, rank):
    m, n = shape
    r = min(m, n)
    spectrum = 1.0 / np.sqrt(np.arange(1, r + 1))
    a = torch.from_numpy(_known(m, n, spectrum, seed=m + rank)).float()
    _, s_np, _ = _numpy_svd(a)
    np.testing.assert_allclose(s_np, spectrum, atol=1e-6)  # the fixture is what it claims to be

    u, s, vh = randomized_svd(a, rank, seed=3)
    assert u.shape == (m, rank) and s.shape == (rank,) and vh.shape == (rank, n)
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    rel = np.abs(s.double().numpy() - s_np[:rank]) / s_np[:rank]
    assert rel.max() <= 0.1 and rel[:max(1, rank // 2)].max() <= 0.01, rel
    assert bool((s[:-1] >= s[1:]).all())
    eye = np.eye(rank)
    np.testing.assert_allclose(u.double().numpy().T @ u.double().numpy(), eye, atol=1e-5)
    np.testing.assert_allclose(vh.double().numpy() @ vh.double().numpy().T, eye, atol=1e-5)

    resid = a.double().numpy() - (u.double().numpy() * s.double().numpy()) @ vh.double().numpy()
    tail = s_np[rank] if rank < r else 0.0
    assert np.linalg.norm(resid, 2) <= 1.1 * tail + 1e-5
    assert np.linalg.norm(resid) <= 1.02 * np.sqrt((s_np[rank:] ** 2).sum()) + 1e-5


def test_faster_decay_top_values_and_vectors():
    """1/i spectrum: the top half of the k values to 1e-5 sigma_1, and their singular vectors to 1e-3
    (the gaps sigma_i - sigma_{i+1} >= 1/(i(i+1)) keep each vector well defined)."""
    m, n, k = 409, 233, 16
    spectrum = 1.0 / np.arange(1, n + 1)
    a = torch.from_numpy(_known(m, n, spectrum, seed=11)).float()
    u_np, s_np, vh_np = _numpy_svd(a)
    u, s, vh = randomized_svd(a, k, seed=5)
    top = k // 2
    np.testing.assert_allclose(s[:top].double().numpy(), s_np[:top], rtol=0, atol=1e-5 * s_np[0])
    for i in range(top):  # same vector up to sign
        sign = np.sign(u[:, i].double().numpy() @ u_np[:, i])
        np.testing.assert_allclose(sign * u[:, i].double().numpy(), u_np[:, i], atol=1e-3)
        np.testing.assert_allclose(sign * vh[i].double().numpy(), vh_np[i], atol=1e-3)


@pytest.mark.parametrize("shape", [(97, 61), (61, 97), (1, 5), (6, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_full_rank_is_exact(shape):
    """rank == min(m, n): the sketch spans the whole range, so A is reproduced to fp32 rounding."""
    m, n = shape
    r = min(m, n)
    a = torch.from_numpy(_known(m, n, 1.0 / np.arange(1, r + 1), seed=m * n)).float()
    u, s, vh = randomized_svd(a, r, seed=1)
    _, s_np, _ = _numpy_svd(a)
    np.testing.assert_allclose(s.double().numpy(), s_np, rtol=0, atol=1e-6)
    np.testing.assert_allclose(((u * s) @ vh).numpy(), a.numpy(), rtol=0, atol=2e-6)


def test_rank_deficient_uses_householder_and_stays_exact():
    """A of rank 5 asked for rank 12: Y = A Omega has 5 independent columns, CholeskyQR fails and Householder
    takes over; U stays orthonormal and the residual is at rounding level."""
    a = torch.from_numpy(_known(123, 77, np.array([5.0, 4.0, 3.0, 2.0, 1.0]), seed=2)).float()
    u, s, vh = randomized_svd(a, 12, seed=0)
    np.testing.assert_allclose(s[:5].double().numpy(), [5, 4, 3, 2, 1], atol=1e-5)
    assert float(s[5:].abs().max()) < 1e-5
    np.testing.assert_allclose((u.T @ u).numpy(), np.eye(12), atol=1e-5)
    np.testing.assert_allclose(((u * s) @ vh).numpy(), a.numpy(), atol=1e-5)


def test_zero_matrix():
    u, s, vh = randomized_svd(torch.zeros(30, 20), 4)
    assert torch.equal(s, torch.zeros(4))
    np.testing.assert_allclose((u.T @ u).numpy(), np.eye(4), atol=1e-6)


def test_orthonormalize_matches_householder_span():
    y = torch.randn(200, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y[:, 3] = y[:, 0] * 1e-9 + y[:, 1]  # nearly dependent columns: cond ~ 1e9, beyond CholeskyQR2's reach
    for mat in (torch.randn(200, 30, dtype=torch.float64), y):
        q = orthonormalize(mat)
        torch.testing.assert_close(q.T @ q, torch.eye(30, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(q @ (q.T @ mat), mat, atol=1e-10, rtol=0)  # spans range(mat)


@pytest.mark.parametrize("block_rows", [1, 7, 255, 256, 257, 300, 1000])
def test_streaming_equals_resident_bitwise(block_rows):
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(531, 67, generator=gen)
    expert = base + torch.randn(531, 67, generator=gen) * torch.linspace(0.1, 2.0, 67)
    resident = randomized_svd(expert - base, 9, seed=21)
    for src in (TensorRowBlocks(expert - base), DifferenceRowBlocks(expert, base)):
        streamed = randomized_svd(src, 9, seed=21, block_rows=block_rows)
        for x, y in zip(resident, streamed):
            assert torch.equal(x, y)


def test_bf16_difference_blocks_widen_before_subtracting():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 33, generator=gen).to(torch.bfloat16)
    expert = (base.float() + torch.randn(40, 33, generator=gen) * 0.01).to(torch.bfloat16)
    ref = randomized_svd(expert.float() - base.float(), 5)
    got = randomized_svd(DifferenceRowBlocks(expert, base), 5, block_rows=3)
    for x, y in zip(ref, got):
        assert torch.equal(x, y)


def test_push_interface_with_ragged_blocks():
    a = torch.randn(260, 40, generator=torch.Generator().manual_seed(1))
    svd = StreamedSVD((260, 40), 6, power_iters=1, seed=2)
    assert svd.passes == 4
    cuts = [0, 3, 3, 200, 259, 260]
    for p in range(svd.passes):
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            svd.consume(p, lo, a[lo:hi])
        svd.end_pass(p)
    for x, y in zip(svd.result(), randomized_svd(a, 6, power_iters=1, seed=2)):
        assert torch.equal(x, y)


def test_deterministic_for_a_seed():
    a = torch.from_numpy(_known(150, 90, 1.0 / np.sqrt(np.arange(1, 91)), seed=0)).float()
    first = randomized_svd(a, 10, seed=7)
    again = randomized_svd(a, 10, seed=7)
    other = randomized_svd(a, 10, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[0], other[0])
    np.testing.assert_allclose(first[1].numpy(), other[1].numpy(), atol=5e-3)  # both accurate


@pytest.mark.parametrize("rank", [0, -1, 21, 2.5, True])
def test_bad_rank_is_config_error(rank):
    with pytest.raises(ConfigError, match="rank"):
        randomized_svd(torch.randn(30, 20), rank)


def test_bad_inputs():
    with pytest.raises(ConfigError, match="2-D"):
        randomized_svd(torch.randn(5, 4, 3), 2)
    with pytest.raises(ConfigError, match="differs"):
        DifferenceRowBlocks(torch.randn(5, 4), torch.randn(4, 5))
    with pytest.raises(ConfigError, match="RowBlockSource"):
        randomized_svd([[1.0, 2.0]], 1)
    svd = StreamedSVD((10, 4), 2)
    svd.consume(0, 0, torch.randn(4, 4))
    with pytest.raises(MergeError, match="expected rows from 4"):
        svd.consume(0, 5, torch.randn(5, 4))  # a gap
    with pytest.raises(MergeError, match="saw 4 of 10 rows"):
        svd.end_pass(0)
    with pytest.raises(MergeError, match="result"):
        StreamedSVD((10, 4), 2).result()


@pytest.mark.parametrize("spectrum,k,route", [
    (np.linspace(1.0, 0.01, 40), 30, "gram"),            # kept sigma >= 1e-4 sigma_1: through the Gram matrix
    (np.logspace(0, -8, 40), 30, "svd"),                 # kept values down to ~1e-6 sigma_1: the plain SVD
    (np.r_[np.linspace(1.0, 0.5, 10), np.zeros(30)], 20, "svd"),  # rank-deficient core
    (np.logspace(0, -8, 40), 12, "gram"),                # only the well-conditioned head kept
])
def test_core_svd_against_numpy(spectrum, k, route, monkeypatch):
    """The float64 core's top-k SVD: singular values, reconstruction and orthonormal factors against numpy, on
    whichever route the conditioning picks (the route is checked by counting torch.linalg.svd calls)."""
    l, n = len(spectrum), 263
    b = torch.from_numpy(_known(l, n, spectrum, seed=k))
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(1) or real_svd(*a, **kw))
    ub, s, vh = core_svd(b, k)
    assert (route == "svd") == bool(calls)
    assert ub.shape == (l, k) and s.shape == (k,) and vh.shape == (k, n) and s.dtype == torch.float64
    u_np, s_np, vh_np = np.linalg.svd(b.numpy(), full_matrices=False)
    np.testing.assert_allclose(s.numpy(), s_np[:k], rtol=1e-9, atol=1e-12 * s_np[0])
    live = s_np[:k] > 1e-6 * s_np[0]  # directions of (near-)zero singular values are arbitrary
    recon = (ub[:, live] * s[live]) @ vh[live]
    want = (u_np[:, :k][:, live] * s_np[:k][live]) @ vh_np[:k][live]
    np.testing.assert_allclose(recon.numpy(), want, atol=1e-9 * s_np[0])
    np.testing.assert_allclose((ub.T @ ub).numpy(), np.eye(k), atol=1e-9)
    np.testing.assert_allclose((vh[live] @ vh[live].T).numpy(), np.eye(int(live.sum())), atol=1e-6)


def test_core_svd_threshold_is_the_documented_ratio(monkeypatch):
    spectrum = np.r_[1.0, np.full(9, 2e-4), np.full(10, 5e-5)]
    b = torch.from_numpy(_known(20, 90, spectrum, seed=3))
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: calls.append(1) or real_svd(*a, **kw))
    core_svd(b, 10)  # smallest kept 2e-4 >= 1e-4: Gram
    assert not calls
    core_svd(b, 11)  # 5e-5 < 1e-4: SVD
    assert calls
    monkeypatch.setattr(rsvd_module, "GRAM_MIN_RATIO", 1e-5)
    calls.clear()
    core_svd(b, 11)
    assert not calls
