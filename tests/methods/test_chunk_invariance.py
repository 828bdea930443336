"""Every method gives bit-identical results whatever the chunking (max_rows_per_chunk in {None, 1, 2, 7}):
masks, thresholds, tie-breaking and random streams must not depend on where the chunks start.

The data mixes two kinds of experts: integer task vectors in [-2, 2] put many exactly equal magnitudes in every
chunk, so the "exactly k" ties at a threshold are spread over chunks and must be taken in flat-index order across
them; task vectors on a fine grid make fp32 sums inexact, so the order of every reduction over experts must not
depend on the chunk's shape either.
"""

from __future__ import annotations

import pytest
import torch

from pymerge.ops import merge_tensors

from . import reference as ref

CHUNKS = [1, 2, 7]
# Up to 19 rows: chunks of 1 row already make 19 chunk boundaries, and the torch backend's selection costs a
# 65,536-bin histogram per chunk and selection, so bigger tensors would only slow the suite down. 1-D tensors
# are a single row (one chunk whatever the limit), so they are not listed.
SHAPES = [(19, 17), (3, 5, 7)]

W = [1.0, -0.5, 0.75, 2.0, 0.25]
D = [0.3, 0.05, 1.0, 0.55, 0.001]
D_DELLA = [0.3, 0.5, 1.0, 0.6, 0.0]

# name -> (method, params, per-expert model params, needs base, experts)
SETUPS = {
    "linear": ("linear", {"normalize": True}, [{"weight": w} for w in W], False, 4),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.8}, [{"weight": w} for w in W], True, 5),
    "ties": ("ties", {"lambda": 1.2}, [{"weight": w, "density": d} for w, d in zip(W, D)], True, 4),
    "ties_count_rescale": ("ties", {"consensus_method": "count", "rescale": True},
                           [{"weight": w, "density": d} for w, d in zip(W, D)], True, 4),
    "ties_global": ("ties", {"trim_scope": "global"}, [{"weight": w, "density": d} for w, d in zip(W, D)], True, 4),
    "dare_ties": ("dare_ties", {}, [{"weight": w, "density": d} for w, d in zip(W, D)], True, 5),
    "dare_linear": ("dare_linear", {"normalize": True}, [{"weight": w, "density": d} for w, d in zip(W, D)],
                    True, 5),
    "breadcrumbs": ("breadcrumbs", {"rescale": True},
                    [{"weight": w, "density": d, "gamma": 0.1} for w, d in zip(W, D)], True, 2),
    "breadcrumbs_ties": ("breadcrumbs_ties", {},
                         [{"weight": w, "density": d, "gamma": g} for w, d, g in zip(W, D, [0.0, 0.2, 0.1, 0.3, 0.05])],
                         True, 4),
    "della": ("della", {}, [{"weight": w, "density": d, "epsilon": 0.2} for w, d in zip(W, D_DELLA)], True, 5),
    "della_linear": ("della_linear", {"lambda": 0.5},
                     [{"weight": w, "density": d, "epsilon": 0.25} for w, d in zip(W, D_DELLA)], True, 5),
    "slerp": ("slerp", {"t": 0.35}, [{}], True, 1),
    "model_stock": ("model_stock", {}, [{}] * 5, True, 5),
    "model_stock_filter_wise": ("model_stock", {"filter_wise": True}, [{}] * 3, True, 3),
    "sce_select": ("sce", {"select_topk": 0.3}, [{}] * 5, True, 5),
    "sce_all": ("sce", {"select_topk": 1.0}, [{}] * 3, True, 3),
    "passthrough": ("passthrough", {}, [{"scale": 0.5}], False, 0),
}


def _run(setup: str, base, experts, chunk):
    method, params, expert_params, needs_base, n = SETUPS[setup]
    inputs = [base, *experts[:n]]
    if needs_base:
        mp = [{}] + expert_params[:n]
        return merge_tensors(method, inputs, base_index=0, params=params, model_params=mp, seed=77,
                             name="blk.3.ffn_up.weight", max_rows_per_chunk=chunk)
    mp = ([{"weight": 0.6}] + expert_params[:n]) if method == "linear" else expert_params
    return merge_tensors(method, inputs, params=params, model_params=mp, max_rows_per_chunk=chunk)


def _mixed_family(shape, seed):
    """Base plus 5 experts: integer task vectors (heavy ties) for experts 0, 2, 4, fine-grained ones for 1, 3."""
    base, tied = ref.integer_family(shape, 3, seed, low=-2, high=2)
    base2, fine = ref.family(shape, 2, seed, shared=0.5)
    fine = [base + (e - base2) for e in fine]
    return base, [tied[0], fine[0], tied[1], fine[1], tied[2]]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("setup", list(SETUPS))
def test_bit_identical_for_any_chunking(setup, shape):
    base, experts = _mixed_family(shape, 5 + shape[0])
    whole = _run(setup, base, experts, None)
    for chunk in CHUNKS:
        got = _run(setup, base, experts, chunk)
        differ = (got != whole).reshape(-1)
        assert not bool(differ.any()), (
            f"max_rows_per_chunk={chunk}: {int(differ.sum())} of {differ.numel()} elements differ from one chunk, "
            f"first at flat index {int(differ.nonzero()[0])}: {float(got.reshape(-1)[differ][0])!r} vs "
            f"{float(whole.reshape(-1)[differ][0])!r}")


def test_ties_threshold_ties_spread_over_chunks():
    """One expert, |tau| = 1 everywhere: k = int(0.37 * 2112) = 781 keeps flat indices [0, 781) whatever the
    chunking, i.e. ties are taken in flat order across chunk boundaries (not per chunk)."""
    base = torch.zeros(64, 33)
    tau = torch.where(torch.arange(64 * 33).reshape(64, 33) % 3 == 0, -1.0, 1.0)
    for chunk in [None, 1, 2, 7]:
        out = merge_tensors("ties", [base, base + tau], base_index=0, max_rows_per_chunk=chunk,
                            model_params=[{}, {"weight": 1.0, "density": 0.37}])
        assert torch.equal((out != 0).reshape(-1), torch.arange(64 * 33) < 781), chunk


# name -> (method, params, per-expert model params): no selection, so a big tensor stays cheap
DENSE_SETUPS = {
    "linear": ("linear", {}, [{"weight": w} for w in (0.3, 0.7, -0.45, 1.1, 0.9, 0.35)]),
    "task_arithmetic": ("task_arithmetic", {"normalize": True},
                        [{}] + [{"weight": w} for w in (0.7, -0.45, 1.1, 0.9, 0.35)]),
    "ties_dense": ("ties", {}, [{}] + [{"weight": w, "density": 1.0} for w in (0.7, -0.45, 1.1, 0.9, 0.35)]),
    "sce_all": ("sce", {}, [{}] * 6),
    "model_stock": ("model_stock", {}, [{}] * 6),
}


@pytest.mark.parametrize("setup", list(DENSE_SETUPS))
def test_expert_reductions_do_not_depend_on_chunk_shape(setup):
    """Five fine-grained experts with non-dyadic weights: every fp32 sum over experts is inexact, so its
    summation order must be the same for a chunk of 1, 2, 7 or 64 rows (torch's vectorized dim-0 reductions
    pick their order from the shape of the chunk)."""
    method, params, mp = DENSE_SETUPS[setup]
    base, experts = ref.family((64, 33), 5, 123, shared=0.3)
    inputs = [base, *experts]
    base_index = None if method == "linear" else 0
    run = lambda chunk: merge_tensors(method, inputs, base_index=base_index, params=params,  # noqa: E731
                                      model_params=mp, max_rows_per_chunk=chunk)
    whole = run(None)
    for chunk in CHUNKS:
        differ = (run(chunk) != whole)
        assert not bool(differ.any()), f"max_rows_per_chunk={chunk}: {int(differ.sum())} elements differ"
