"""The SVD merge family (tsv_m, iso_c, iso_cts, star, cart) against float64 numpy oracles transcribed from the
reference code (FusionBench TSVM_utils.compute_and_sum_svd_mem_reduction and iso_utils.iso_c/iso_cts,
IBM/STAR merger/STAR.py + the runner's average, JH-GEECS/CART src/merging.py), on random odd-shaped tensors.

Tolerances, and why:
* exact mode: every element within 5e-6 (values are O(1), up to ~5; an fp32 ulp there is 4.8e-7). The oracle
  runs numpy LAPACK in float64 on the same fp32 inputs; ours forms task vectors in fp32 (<= 0.5 ulp each), runs
  torch float64 SVDs, rounds the delta to fp32 and adds it to the base in fp32: a few ulps (measured max
  1.2e-6, for cart with rank_ratio 1.0).
* randomized mode: the data have a spectral gap at the kept rank (task vectors = rank-k signal + 1e-4 noise),
  so the sketch finds the same top-k subspace as the exact SVD up to (noise / signal)^(2q+1) ~ 1e-20, and the
  factors differ from the oracle's by the fp32 rounding of the streamed products: same 5e-6 (measured 2.3e-7).
* chunked vs resident: bit-identical (torch.equal), because the SVD inputs are gathered or re-cut into fixed
  blocks and the output rows are formed over fixed row blocks (see pymerge/methods/lowrank.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import pymerge
from pymerge.errors import ConfigError
from pymerge.methods.lowrank import use_randomized
from pymerge.ops import merge_tensors

ATOL_EXACT = 5e-6
ATOL_RANDOMIZED = 5e-6


# ----------------------------------------------------------------- float64 oracles (numpy, from the references)
def _svd(a):
    return np.linalg.svd(a, full_matrices=False)


def _polar(a):
    u, _, vh = _svd(a)
    return u @ vh


def tsv_m_ref(taus, alpha=1.0, weights=None):
    """compute_and_sum_svd_mem_reduction: zero-padded sum_u [m, r], sum_s, sum_vh [r, n]; alpha after."""
    t = len(taus)
    taus = [tau * (1.0 if weights is None else w) for tau, w in zip(taus, weights or [1.0] * t)]
    if taus[0].ndim != 2:
        return alpha * sum(taus) / t
    m, n = taus[0].shape
    r = min(m, n)
    k = int(r * (1 / t))
    sum_u, sum_s, sum_vh = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for i, tau in enumerate(taus):
        u, s, vh = _svd(tau)
        sum_u[:, i * k:(i + 1) * k] = u[:, :k]
        sum_s[i * k:(i + 1) * k] = s[:k]
        sum_vh[i * k:(i + 1) * k] = vh[:k]
    return alpha * (_polar(sum_u) @ np.diag(sum_s) @ _polar(sum_vh))


def iso_c_ref(taus, scaling_factor=1.0):
    mean = sum(taus) / len(taus)
    if taus[0].ndim != 2:
        return scaling_factor * mean
    u, s, vh = _svd(mean * len(taus))
    return scaling_factor * (u @ np.diag(np.full_like(s, s.mean())) @ vh)


def iso_cts_ref(taus, common_space_fraction=0.8, scaling_factor=1.0):
    t = len(taus)
    if taus[0].ndim != 2:
        return scaling_factor * sum(taus) / t
    r = min(taus[0].shape)
    c = int(r * common_space_fraction)
    c = r - round((r - c) / t) * t
    u, s, vh = _svd(sum(taus))
    cu, cs, cvh = u[:, :c], s[:c], vh[:c]
    d = int((r - c) / t)
    comb_u, comb_s, comb_vh = np.zeros((taus[0].shape[0], r)), np.zeros(r), np.zeros((r, taus[0].shape[1]))
    for i, tau in enumerate(taus):
        u_ts, s_ts, vh_ts = _svd(tau - cu @ cu.T @ tau)
        comb_u[:, i * d:(i + 1) * d] = u_ts[:, :d]
        comb_s[i * d:(i + 1) * d] = s_ts[:d]
        comb_vh[i * d:(i + 1) * d] = vh_ts[:d]
    comb_u[:, t * d:t * d + c] = cu
    comb_s[t * d:t * d + c] = cs
    comb_vh[t * d:t * d + c] = cvh
    return scaling_factor * (_polar(comb_u) @ np.diag(np.full(r, comb_s.mean())) @ _polar(comb_vh))


def star_ref(taus, eta=40.0, known_rank=None):
    t = len(taus)
    if taus[0].ndim != 2:
        return sum(taus) / t
    out = 0.0
    for tau in taus:
        u, s, vh = _svd(tau)
        if known_rank is not None:
            u, s, vh = u[:, :known_rank], s[:known_rank], vh[:known_rank]
        total = s.sum()
        keep = int(np.searchsorted(np.cumsum(s), total * eta / 100, side="left")) + 1
        s_keep = s[:keep] * (total / s[:keep].sum())
        out = out + (u[:, :keep] * s_keep) @ vh[:keep] / t
    return out


def cart_ref(base, thetas, name, prior=2.0, rank_ratio=0.12):
    """Returns theta (not a delta): theta_bar + prior * sum_t LowRank_k(theta_t - theta_bar)."""
    t = len(thetas)
    bar = base + sum(th - base for th in thetas) / t
    if not (base.ndim == 2 and ("attn" in name or "mlp" in name) and not ("ln" in name or "bias" in name)):
        return bar
    r = min(base.shape)
    k = 0 if rank_ratio == 0 else (r if rank_ratio == 1.0 else max(1, int(rank_ratio * r)))
    total = np.zeros_like(base)
    for th in thetas:
        u, s, vh = _svd(th - bar)
        total += (u[:, :k] * s[:k]) @ vh[:k]
    return bar + prior * total


def oracle(method, params, base, experts, name="blk.0.mlp.up.weight", weights=None):
    """theta from the float64 oracle of ``method`` on fp32 inputs (as numpy float64)."""
    b = base.double().numpy()
    ex = [e.double().numpy() for e in experts]
    if method == "cart":
        return cart_ref(b, ex, name, **params)
    taus = [e - b for e in ex]
    if method == "tsv_m":
        return b + tsv_m_ref(taus, weights=weights, **params)
    if method == "iso_c":
        return b + iso_c_ref(taus, **params)
    if method == "iso_cts":
        return b + iso_cts_ref(taus, **params)
    return b + star_ref(taus, **params)


# ----------------------------------------------------------------- data
def family(shape, n_experts, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * scale * (1 + i) for i in range(n_experts)]


def run(method, base, experts, params=None, name="blk.0.mlp.up.weight", weights=None, chunk=None):
    mp = [{}] + ([{"weight": w} for w in weights] if weights else [{} for _ in experts])
    return merge_tensors(method, [base, *experts], base_index=0, params=params or {}, model_params=mp, name=name,
                         max_rows_per_chunk=chunk, seed=5)


def assert_all_close(got, want, atol, what):
    got = got.double().numpy()
    err = np.abs(got - want)
    assert got.shape == want.shape, what
    assert err.max() <= atol, f"{what}: max |err| {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


# (method, params, weights or None)
CASES = {
    "tsv_m": ("tsv_m", {}, None),
    "tsv_m_weighted": ("tsv_m", {"alpha": 0.7}, [1.0, 0.5, 2.0]),
    "iso_c": ("iso_c", {}, None),
    "iso_c_scaled": ("iso_c", {"scaling_factor": 1.3}, None),
    "iso_cts": ("iso_cts", {}, None),
    "iso_cts_0.55": ("iso_cts", {"common_space_fraction": 0.55, "scaling_factor": 0.9}, None),
    "star": ("star", {}, None),
    "star_eta75": ("star", {"eta": 75.0}, None),
    "cart": ("cart", {}, None),
    "cart_r0.3": ("cart", {"prior": 1.5, "rank_ratio": 0.3}, None),
    "cart_full": ("cart", {"rank_ratio": 1.0}, None),
}
SHAPES = [(37, 23), (23, 41), (29,), (3, 5, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(CASES))
def test_exact_mode_matches_oracle(case, shape):
    method, params, weights = CASES[case]
    base, experts = family(shape, 3, seed=len(shape) * 100 + shape[0])
    params = dict(params)
    ours_params = dict(params, **({"svd_mode": "exact"} if method in ("tsv_m", "cart") else {}))
    got = run(method, base, experts, ours_params, weights=weights)
    want = oracle(method, params, base, experts, weights=weights)
    assert_all_close(got, want, ATOL_EXACT, f"{case} {shape}")


@pytest.mark.parametrize("method", ["star", "cart"])
def test_tensors_without_svd_follow_the_reference_rule(method):
    """CART's name filter: 'lm_head.weight' (no attn/mlp) and '...mlp.bias'-like names are theta_bar; STAR/TSV
    apply to every 2-D tensor whatever its name."""
    base, experts = family((19, 11), 3, seed=1)
    for name in ["lm_head.weight", "blk.0.attn_ln.weight", "blk.0.self_attn.q_proj.weight"]:
        got = run(method, base, experts, name=name)
        assert_all_close(got, oracle(method, {}, base, experts, name=name), ATOL_EXACT, name)


def _gap_family(shape, n_experts, rank, seed, noise=1e-4):
    """Task vectors = rank-``rank`` signal (singular values 1..2) + small dense noise: a clear gap at ``rank``."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = torch.randn(shape, generator=g)
    experts = []
    for _ in range(n_experts):
        u = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
        s = torch.linspace(2.0, 1.0, rank, dtype=torch.float64)
        experts.append(base + ((u * s) @ v.T).float() + noise * torch.randn(shape, generator=g))
    return base, experts


def test_tsv_m_randomized_matches_oracle():
    """T = 6 tasks on 311 x 97: k = 16 and 3 (k + 10) < 97, so 'auto' picks the streamed randomized SVD."""
    shape, t = (311, 97), 6
    k = int(97 * (1 / t))
    assert use_randomized("auto", k, shape, "x", "tsv_m")
    base, experts = _gap_family(shape, t, k, seed=3)
    got = run("tsv_m", base, experts, {"alpha": 1.1})
    assert_all_close(got, oracle("tsv_m", {"alpha": 1.1}, base, experts), ATOL_RANDOMIZED, "tsv_m randomized")


def test_star_known_rank_matches_oracle():
    """LoRA-like task vectors of rank 6 (plus 1e-4 noise), known_rank 6: randomized rank-6 SVD."""
    base, experts = _gap_family((157, 83), 3, 6, seed=4)
    got = run("star", base, experts, {"known_rank": 6, "eta": 60.0})
    want = oracle("star", {"known_rank": 6, "eta": 60.0}, base, experts)
    assert_all_close(got, want, ATOL_RANDOMIZED, "star known_rank")


def test_cart_randomized_matches_oracle():
    """Two experts symmetric about theta_bar, each deviation rank-k plus noise: delta_t has the gap at k."""
    shape, ratio = (263, 101), 0.12
    k = int(ratio * 101)
    base, (e1,) = _gap_family(shape, 1, k, seed=6)
    bar = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    dev = e1 - base
    experts = [bar + dev, bar - dev]
    assert use_randomized("auto", k, shape, "x", "cart")
    got = run("cart", bar * 0.5, experts)  # any base: CART only uses it through theta_bar
    want = oracle("cart", {}, bar * 0.5, experts)
    assert_all_close(got, want, ATOL_RANDOMIZED, "cart randomized")


CHUNK_CASES = {
    **{c: CASES[c] for c in ["tsv_m_weighted", "iso_c", "iso_cts", "star", "cart"]},
    "tsv_m_randomized": ("tsv_m", {"svd_mode": "randomized"}, None),
    "cart_randomized": ("cart", {"svd_mode": "randomized", "rank_ratio": 0.3}, None),
    "star_known_rank": ("star", {"known_rank": 5}, None),
}


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunked_equals_resident_bitwise(case):
    """300 rows: chunks of 1, 7 and 100 rows all straddle the 256-row canonical block boundary."""
    method, params, weights = CHUNK_CASES[case]
    base, experts = family((300, 19), 3, seed=11)
    whole = run(method, base, experts, params, weights=weights)
    for chunk in (1, 7, 100):
        got = run(method, base, experts, params, weights=weights, chunk=chunk)
        assert torch.equal(got, whole), f"{case}: chunk {chunk}: {int((got != whole).sum())} elements differ"


def test_tsv_m_more_tasks_than_rank_keeps_the_base():
    """r = 2 < T = 3: k = 0 task singular vectors, the reference's delta is zero."""
    base, experts = family((2, 9), 3, seed=2)
    got = run("tsv_m", base, experts)
    assert torch.equal(got, base)
    assert_all_close(got, oracle("tsv_m", {}, base, experts), ATOL_EXACT, "k = 0")


def test_star_zero_task_vector_contributes_zero():
    base, experts = family((13, 7), 2, seed=8)
    got = run("star", base, [experts[0], base.clone()])
    b = base.double().numpy()
    want = b + star_ref([experts[0].double().numpy() - b], 40.0) / 2  # the zero task vector adds nothing
    assert_all_close(got, want, ATOL_EXACT, "zero task vector")


def test_use_randomized_rule():
    assert not use_randomized("auto", 20, (100, 90), "x", "m")  # (20 + 10) * 3 = 90 >= 90
    assert use_randomized("auto", 19, (100, 90), "x", "m")
    assert use_randomized("randomized", 50, (100, 90), "x", "m")
    assert not use_randomized("exact", 1, (1000, 900), "x", "m")
    with pytest.raises(ConfigError, match="svd_mode"):
        use_randomized("fast", 1, (10, 10), "x", "m")


@pytest.mark.parametrize("method,params,msg", [
    ("iso_cts", {"common_space_fraction": 1.5}, "common_space_fraction"),
    ("cart", {"rank_ratio": -0.1}, "rank_ratio"),
    ("star", {"known_rank": 0}, "known_rank"),
    ("tsv_m", {"svd_mode": "fast"}, "svd_mode"),
])
def test_bad_parameters_are_config_errors(method, params, msg):
    base, experts = family((9, 7), 2, seed=0)
    with pytest.raises(ConfigError, match=msg):
        run(method, base, experts, params)


def test_base_is_required():
    base, experts = family((9, 7), 2, seed=0)
    with pytest.raises(ConfigError):
        merge_tensors("iso_c", [base, *experts], params={})


# ----------------------------------------------------------------- end to end on the tiny Llama family
E2E = {
    "tsv_m": ({"alpha": 0.8}, None),
    "iso_c": ({"scaling_factor": 1.2}, None),
    "iso_cts": ({}, None),
    "star": ({"eta": 50.0}, None),
    "cart": ({"rank_ratio": 0.3}, None),
}


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("method", list(E2E))
def test_end_to_end_tiny_family(tmp_path, tiny_family, method):
    params, _ = E2E[method]
    cfg = {"merge_method": method, "base_model": str(tiny_family.base), "dtype": "float32",
           "models": [{"model": str(p)} for p in tiny_family.experts], "parameters": params}
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    pymerge.merge(str(path), tmp_path / "out", quiet=True)
    small = pymerge.merge(str(path), tmp_path / "small", quiet=True, max_memory=16 * 1024)
    assert small.chunked_tensors >= 1
    got = _load_dir(tmp_path / "out")
    got_small = _load_dir(tmp_path / "small")
    base = _load_dir(tiny_family.base)
    experts = [_load_dir(p) for p in tiny_family.experts]
    assert set(got) == set(base)
    kinds = set()
    for name, out in got.items():
        assert torch.equal(out, got_small[name]), f"{name}: output depends on the memory budget"
        want = oracle(method, params, base[name], [e[name] for e in experts], name=name)
        assert_all_close(out, want, ATOL_EXACT, f"{method} {name}")
        kinds.add(out.dim())
    assert kinds == {1, 2}
