"""Invariants of the sparsifiers, read back from merged outputs: exact-k masks, sign agreement, the keep-rates of
the random masks, degenerate task vectors (all magnitudes equal, all zero) and parameter validation.

A mask is recovered from a single-expert merge with weight 1 and lambda 1: every task-vector entry is nonzero
and on the 2**-20 grid (or an integer), so ``out - base`` is exactly ``tau`` where kept and exactly 0 elsewhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from pymerge.errors import ConfigError
from pymerge.ops import keep_mask, merge_tensors

from . import reference as ref

NAME = "model.layers.0.self_attn.q_proj.weight"


def _single(method: str, base, expert, params=None, seed: int = 0, **model_params) -> torch.Tensor:
    return merge_tensors(method, [base, expert], base_index=0, params=params or {}, seed=seed, name=NAME,
                         model_params=[{}, {"weight": 1.0, **model_params}])


def _recovered_mask(out: torch.Tensor, base: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    tau = expert - base
    assert bool((tau != 0).all()), "mask recovery needs a nonzero task vector"
    delta = out - base
    kept = delta != 0
    assert torch.equal(delta[kept], tau[kept]), "kept entries must be the task vector itself"
    return kept


# --------------------------------------------------------------------------------------------------------------
# Exact k: ties and breadcrumbs masks, with heavy ties
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.97])
def test_ties_mask_keeps_exactly_k_lowest_index_ties(shape, density):
    base, (expert,) = ref.integer_family(shape, 1, 11, low=-2, high=2, nonzero=True)  # |tau| in {1, 2}
    out = _single("ties", base, expert, density=density)
    kept = _recovered_mask(out, base, expert)
    n = math.prod(shape)
    assert int(kept.sum()) == max(1, int(density * n))
    assert torch.equal(kept, ref.magnitude_keep(expert - base, density))


@pytest.mark.parametrize("shape", [(7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("density,gamma", [(0.001, 0.01), (0.3, 0.01), (0.5, 0.2), (0.9, 0.3), (0.6, 0.0)])
def test_breadcrumbs_mask_keeps_exactly_target(shape, density, gamma):
    base, (expert,) = ref.integer_family(shape, 1, 12, low=-3, high=3, nonzero=True)
    out = _single("breadcrumbs", base, expert, density=density, gamma=gamma)
    kept = _recovered_mask(out, base, expert)
    n = math.prod(shape)
    assert int(kept.sum()) == int(density * n)
    assert torch.equal(kept, ref.outlier_keep(expert - base, density, gamma))


def test_all_equal_magnitudes_keep_lowest_indices():
    """|tau| all equal: ties keeps flat indices [0, k); breadcrumbs keeps [n_top, n_top + target)."""
    shape = (9, 11)
    n = 99
    g = torch.Generator().manual_seed(3)
    base = ref.on_grid(torch.randn(shape, generator=g))
    signs = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    expert = base + 0.25 * signs
    kept = _recovered_mask(_single("ties", base, expert, density=0.3), base, expert).reshape(-1)
    assert torch.equal(kept, torch.arange(n) < 29)
    kept = _recovered_mask(_single("breadcrumbs", base, expert, density=0.3, gamma=0.1), base, expert).reshape(-1)
    assert torch.equal(kept, (torch.arange(n) >= 9) & (torch.arange(n) < 9 + 29))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                                    "breadcrumbs_ties", "della", "della_linear"])
def test_all_zero_task_vectors_give_the_base(method):
    base, _ = ref.family((31, 17), 0, 4)
    density = 0.4 if method.startswith("della") else 0.3
    ours = merge_tensors(method, [base, base.clone(), base.clone()], base_index=0,
                         params={"rescale": True} if method != "task_arithmetic" else {},
                         model_params=[{}, {"weight": 1.0, "density": density}, {"weight": 2.0, "density": 1.0}])
    assert torch.equal(ours, base)


@pytest.mark.parametrize("values,factor", [
    ([5e-9, 1e-9, 2e-9, 3e-9, 4e-9], 1.0),  # ||tau||_1 = 1.5e-8 < 1e-7: no rescale
    ([9e-8, 3e-8, 3e-8, 3e-8, 3e-8], 1.0),  # ||tau||_1 = 2.1e-7, kept 9e-8 < 1e-7: no rescale
    ([1.2e-7, 3e-8, 3e-8, 3e-8, 3e-8], None),  # both >= 1e-7: rescaled by 2.4e-7 / 1.2e-7
    ([4.0, -1.0, 1.0, 0.5, -0.5], None),
])
def test_l1_rescale_and_its_eps(values, factor):
    """Rescale multiplies the kept entries by ||tau||_1 / ||kept||_1 unless either norm is below 1e-7."""
    base = torch.zeros(5)
    expert = torch.tensor(values, dtype=torch.float32)
    out = merge_tensors("ties", [base, expert], base_index=0, params={"rescale": True},
                        model_params=[{}, {"weight": 1.0, "density": 0.2}])
    tau = expert.double()
    keep = ref.magnitude_keep(tau, 0.2)
    assert int(keep.sum()) == 1 and bool(keep[0])
    if factor is not None:
        assert ref.l1_rescale(tau, keep) == factor
        assert torch.equal(out, expert * keep)
    else:
        assert ref.l1_rescale(tau, keep) > 1
    ref.assert_matches(out, ref.gta(base, [expert], [1.0], keeps=[keep], rescale=True, consensus="sum",
                                    normalize=True))


# --------------------------------------------------------------------------------------------------------------
# Sign agreement
# --------------------------------------------------------------------------------------------------------------

def test_ties_designed_election_sum_vs_count():
    """One large positive and two small negative task vectors: "sum" elects +, "count" elects -; the disjoint
    mean then takes exactly the agreeing experts."""
    base = torch.zeros(4)
    a, b, c = base + 3.0, base - 0.5, base - 1.0
    mp = [{}] + [{"weight": 1.0, "density": 1.0}] * 3
    out_sum = merge_tensors("ties", [base, a, b, c], base_index=0, model_params=mp)
    out_count = merge_tensors("ties", [base, a, b, c], base_index=0, model_params=mp,
                              params={"consensus_method": "count"})
    assert torch.equal(out_sum, torch.full((4,), 3.0))
    assert torch.equal(out_count, torch.full((4,), -0.75))


def test_ties_zero_sum_elects_plus():
    """An election sum of exactly 0 elects +1 (mergekit: sum >= 0); zero task vectors never agree."""
    base = torch.zeros(3)
    a = torch.tensor([1.0, 0.0, 2.0])
    b = torch.tensor([-1.0, 0.0, -2.0])
    out = merge_tensors("ties", [base, a, b], base_index=0,
                        model_params=[{}, {"weight": 1.0, "density": 1.0}, {"weight": 1.0, "density": 1.0}])
    assert torch.equal(out, torch.tensor([1.0, 0.0, 2.0]))


@pytest.mark.parametrize("method,consensus", [("ties", "sum"), ("ties", "count"), ("dare_ties", "sum"),
                                              ("breadcrumbs_ties", "count"), ("della", "sum")])
def test_merged_delta_agrees_with_elected_sign(method, consensus):
    """With positive weights and normalize on, the merged delta is a weighted mean of the agreeing
    contributions: it has the elected sign (or is 0) and lies within their range."""
    shape = (64, 33)
    base, experts = ref.family(shape, 3, 21, zero_frac=0.05)
    weights = [0.5, 1.0, 1.5]
    densities = [0.5, 0.4, 0.6]
    mp = [{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    seed = 99
    ours = merge_tensors(method, [base, *experts], base_index=0, model_params=mp, seed=seed, name=NAME,
                         params={"consensus_method": consensus, "normalize": True, "rescale": False})
    taus = [e.double() - base.double() for e in experts]
    if method == "ties":
        keeps = [ref.magnitude_keep(t, d) for t, d in zip(taus, densities)]
    elif method == "dare_ties":
        keeps = [keep_mask(seed, i + 1, NAME, 0, t.numel(), d).reshape(shape) for i, (t, d) in
                 enumerate(zip(taus, densities))]
    elif method == "breadcrumbs_ties":
        keeps = [ref.outlier_keep(t, d, 0.01) for t, d in zip(taus, densities)]
    else:
        keeps = [ref.della_keep(t, d, 0.15, ref.philox_uniform(seed, i + 1, NAME, shape))
                 for i, (t, d) in enumerate(zip(taus, densities))]
    deltas = torch.stack([t * k * w for t, k, w in zip(taus, keeps, weights)])
    agree = ref.elect(deltas, consensus)
    gamma = torch.where(deltas.sum(0) >= 0, 1.0, -1.0) if consensus == "sum" else \
        torch.where(deltas.sign().sum(0) >= 0, 1.0, -1.0)
    merged = ours.double() - base.double()
    nonzero = merged != 0
    assert bool((merged.sign()[nonzero] == gamma[nonzero]).all())
    assert not bool(nonzero[~agree.any(0)].any()), "no agreeing expert: the delta must be 0"
    kept = torch.stack([t * k for t, k in zip(taus, keeps)])
    lo = torch.where(agree, kept, torch.full_like(kept, math.inf)).amin(0)
    hi = torch.where(agree, kept, torch.full_like(kept, -math.inf)).amax(0)
    inside = agree.any(0)
    slack = 1e-6 * kept.abs().amax(0)
    assert bool((merged[inside] >= lo[inside] - slack[inside]).all())
    assert bool((merged[inside] <= hi[inside] + slack[inside]).all())


# --------------------------------------------------------------------------------------------------------------
# Random masks: DARE keep-rate and identity, DELLA per-rank rates and float64 mask
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_dare_keep_rate_within_binomial_bounds(density):
    shape = (256, 257)
    n = math.prod(shape)
    base = torch.zeros(shape)
    expert = torch.full(shape, 0.5)
    out = _single("dare_linear", base, expert, params={"rescale": False}, seed=5, density=density)
    kept = _recovered_mask(out, base, expert)
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(int(kept.sum()) - n * density) < 6 * sigma
    # the mask is Philox's u < density for model id 1 (the expert's input position), element by element
    assert torch.equal(kept, keep_mask(5, 1, NAME, 0, n, density).reshape(shape))
    u = ref.philox_uniform(5, 1, NAME, shape)
    clear = (u - density).abs() > 1e-6
    assert torch.equal(kept[clear], (u < density)[clear])


def test_dare_mask_keyed_by_seed_name_and_model_id():
    base, (expert,) = ref.family((31, 17), 1, 8)
    mp = [{}, {"weight": 1.0, "density": 0.5}]
    run = lambda **kw: merge_tensors("dare_linear", [base, expert], base_index=0, model_params=mp,  # noqa: E731
                                     params={"rescale": False}, **kw)
    first = run(seed=1, name="a")
    assert torch.equal(first, run(seed=1, name="a"))
    assert not torch.equal(first, run(seed=2, name="a"))
    assert not torch.equal(first, run(seed=1, name="b"))
    assert not torch.equal(first, run(seed=1, name="a", model_ids=[0, 7]))


def test_della_per_rank_keep_rate_tracks_probabilities():
    """Over many rows, the keep-rate of the r-th smallest magnitude is (d - eps) + 2 eps r / (cols - 1)."""
    rows, cols = 3000, 33
    density, eps = 0.4, 0.2
    g = torch.Generator().manual_seed(6)
    base = torch.zeros(rows, cols)
    expert = ref.on_grid(torch.rand(rows, cols, generator=g) + 0.01)  # distinct positive magnitudes
    out = _single("della_linear", base, expert, params={"rescale": False}, seed=17, density=density,
                  epsilon=eps)
    kept = _recovered_mask(out, base, expert)
    ranks = torch.argsort(torch.argsort(expert, dim=1, stable=True), dim=1)
    for r in range(cols):
        p = (density - eps) + 2 * eps * r / (cols - 1)
        rate = kept[ranks == r].double().mean().item()
        assert abs(rate - p) < 6 * math.sqrt(p * (1 - p) / rows), (r, rate, p)
    per_row = kept.double().mean(dim=1)
    assert abs(per_row.mean().item() - density) < 6 * math.sqrt(density * (1 - density) / (rows * cols))


@pytest.mark.parametrize("shape", [(1,), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)], ids=str)
def test_della_mask_matches_float64_probabilities(shape):
    """The DELLA mask equals u < p with p recomputed in float64 (mergekit's rank axis, dim 1), wherever p is
    not within 1e-6 of its uniform."""
    g = torch.Generator().manual_seed(9)
    base = ref.on_grid(torch.randn(shape, generator=g))
    expert = base + ref.on_grid(torch.randint(1, 8, shape, generator=g) * 0.125
                                * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0))
    density, eps = 0.5, 0.3
    out = _single("della_linear", base, expert, params={"rescale": False}, seed=23, density=density,
                  epsilon=eps)
    kept = _recovered_mask(out, base, expert)
    tau = expert.double() - base.double()
    p = ref.della_probabilities(tau, density, eps)
    u = ref.philox_uniform(23, 1, NAME, shape)
    clear = (u - p).abs() > ref.DELLA_AMBIGUITY
    assert torch.equal(kept[clear], (u < p)[clear])


def test_della_one_element_rows_use_low_probability():
    """A one-element row has rank ratio 0: its keep probability is d - eps (mergekit would divide 0 by 0)."""
    shape = (4000, 1)
    density, eps = 0.5, 0.3
    base = torch.zeros(shape)
    expert = torch.ones(shape)
    out = _single("della_linear", base, expert, params={"rescale": False}, seed=2, density=density, epsilon=eps)
    kept = _recovered_mask(out, base, expert)
    u = ref.philox_uniform(2, 1, NAME, shape)
    assert torch.equal(kept, u < density - eps)


# --------------------------------------------------------------------------------------------------------------
# Parameter validation
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density,eps", [(0.1, 0.15), (0.9, 0.1), (0.5, 0.5)])
def test_della_rejects_density_eps_outside_unit_interval(density, eps):
    base, (expert,) = ref.family((7,), 1, 1)
    with pytest.raises(ConfigError, match="epsilon"):
        _single("della", base, expert, density=density, epsilon=eps)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della"])
def test_negative_density_rejected(method):
    base, (expert,) = ref.family((7,), 1, 1)
    with pytest.raises(ConfigError, match="density"):
        _single(method, base, expert, density=-0.1)


def test_unknown_consensus_and_trim_scope_rejected():
    base, (expert,) = ref.family((7,), 1, 1)
    with pytest.raises(ConfigError, match="consensus_method"):
        _single("ties", base, expert, params={"consensus_method": "max"}, density=0.5)
    with pytest.raises(ConfigError, match="trim_scope"):
        _single("ties", base, expert, params={"trim_scope": "layer"}, density=0.5)
    with pytest.raises(ConfigError, match="rescale"):
        _single("ties", base, expert, params={"trim_scope": "global", "rescale": True}, density=0.5)
