"""The eight generalized-task-arithmetic methods against the float64 oracle ``reference.gta``, every element.

Each case runs one method on random data of an odd shape with 1, 2, 3 or 5 experts, per-model weights that
include negative and zero ones, densities that include 0, 1, 0.001 (int(d*n) = 0) and 0.999 (k = n - 1 or
n_bot = 0), lambda != 1, normalize on/off, rescale on/off and both consensus methods, with the base at various
input positions and Philox model ids that are not input positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pymerge.ops import keep_mask, merge_tensors

from . import reference as ref

SHAPES = [(), (7,), (13, 1), (31, 17), (64, 33), (3, 5, 7)]  # () and (1,) are both a single element

# method -> (sparsifier, consensus?, default normalize, default rescale): mergekit 0.1.5's registry, restated
METHODS = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": ("magnitude_outliers", True, False, False),
    "della": ("della_magprune", True, True, True),
    "della_linear": ("della_magprune", False, False, True),
}


@dataclass(frozen=True)
class Case:
    weights: tuple
    densities: tuple  # magnitude / random / breadcrumbs
    della_densities: tuple  # DELLA needs d +- eps inside (0, 1) for 0 < d < 1
    epsilons: tuple
    gammas: tuple
    lam: float | None  # None: the method's default (1)
    normalize: bool | None  # None: the method's default
    rescale: bool | None
    consensus: str | None  # None: the default ("sum")
    base_index: int
    model_ids: tuple | None = None  # None: input positions


CASES = {
    "1x-defaults": Case((0.8,), (0.3,), (0.3,), (0.15,), (0.01,), None, None, None, None, 0),
    "2x-count-norm": Case((1.0, -0.6), (0.001, 1.0), (0.4, 1.0), (0.2, 0.15), (0.1, 0.0), 0.7, True, False,
                          "count", 1),
    "3x-sum-rescale": Case((0.7, 0.0, 1.3), (0.0, 0.55, 0.999), (0.0, 0.55, 0.8), (0.1, 0.3, 0.1),
                           (0.05, 0.2, 0.3), 1.5, False, True, "sum", 0, model_ids=(4, 0, 9, 2)),
    "5x-sum-norm-rescale": Case((1.0, -0.45, 0.0, 2.0, 0.3), (1.0, 0.2, 0.05, 0.0, 0.7),
                                (1.0, 0.2, 0.35, 0.0, 0.7), (0.15, 0.1, 0.15, 0.1, 0.25),
                                (0.02, 0.1, 0.0, 0.5, 0.25), -0.5, True, True, "sum", 3),
    "5x-count-plain": Case((0.5, 1.2, -0.3, 0.9, 0.25), (0.6, 0.999, 0.001, 0.3, 0.0),
                           (0.6, 0.7, 0.5, 0.3, 0.0), (0.2, 0.25, 0.3, 0.1, 0.1),
                           (0.3, 0.0, 0.1, 0.01, 0.05), 1.0, False, False, "count", 5),
}

NAME = "model.layers.3.mlp.down_proj.weight"


def _run_case(method: str, shape, case: Case, seed: int):
    """(ours, Ref) for one method and case."""
    sparsifier, consensus, default_norm, default_rescale = METHODS[method]
    n_exp = len(case.weights)
    base, experts = ref.family(shape, n_exp, seed, zero_frac=0.1)
    inputs = list(experts)
    inputs.insert(case.base_index, base)
    expert_pos = [i for i in range(n_exp + 1) if i != case.base_index]
    model_ids = list(case.model_ids) if case.model_ids else list(range(n_exp + 1))
    densities = case.della_densities if sparsifier == "della_magprune" else case.densities

    params = {}
    for key, value in (("lambda", case.lam), ("normalize", case.normalize), ("rescale", case.rescale)):
        if value is not None:
            params[key] = value
    if consensus and case.consensus:
        params["consensus_method"] = case.consensus
    model_params = [{} for _ in inputs]
    for e, pos in enumerate(expert_pos):
        p = {"weight": case.weights[e], "density": densities[e]}
        if sparsifier == "magnitude_outliers":
            p["gamma"] = case.gammas[e]
        if sparsifier == "della_magprune":
            p["epsilon"] = case.epsilons[e]
        model_params[pos] = p
    ours = merge_tensors(method, inputs, base_index=case.base_index, params=params, model_params=model_params,
                         seed=seed, name=NAME, model_ids=model_ids)

    keeps = []
    for e, pos in enumerate(expert_pos):
        tau = experts[e].double() - base.double()
        d = densities[e]
        if sparsifier is None or d >= 1:
            keeps.append(None)
        elif sparsifier == "magnitude":
            keeps.append(ref.magnitude_keep(tau, d))
        elif sparsifier == "magnitude_outliers":
            keeps.append(ref.outlier_keep(tau, d, case.gammas[e]))
        elif sparsifier == "random":
            keeps.append(keep_mask(seed, model_ids[pos], NAME, 0, tau.numel(), d).reshape(shape))
        else:
            u = ref.philox_uniform(seed, model_ids[pos], NAME, shape)
            keeps.append(ref.della_keep(tau, d, case.epsilons[e], u))
    expected = ref.gta(base, experts, case.weights, keeps=keeps,
                       rescale=default_rescale if case.rescale is None else case.rescale,
                       consensus=(case.consensus or "sum") if consensus else None,
                       normalize=default_norm if case.normalize is None else case.normalize,
                       lam=1.0 if case.lam is None else case.lam)
    return ours, expected


def _seed(case: str, shape) -> int:
    return 1000 + 17 * list(CASES).index(case) + len(shape) * 101 + (shape[0] if shape else 0)


# DELLA's 3-D case has its own test below (the rank axis), so one finding fails one test, not eight
_COMBOS = [(m, c, s) for m in METHODS for c in CASES for s in SHAPES
           if not (METHODS[m][0] == "della_magprune" and len(s) > 2)]


@pytest.mark.parametrize("method,case,shape", _COMBOS,
                         ids=[f"{m}-{c}-{'x'.join(map(str, s)) or 'scalar'}" for m, c, s in _COMBOS])
def test_gta_method_matches_float64_oracle(method, case, shape):
    ours, expected = _run_case(method, shape, CASES[case], _seed(case, shape))
    assert ours.dtype == torch.float32
    ref.assert_matches(ours, expected)


def test_della_ranks_along_dim_1_of_a_3d_tensor():
    """mergekit's della_magprune ranks |tau| along dim 1 (argsort(dim=1)) for a tensor of >= 2 dims, so for
    a [3, 5, 7] tensor each of the 3 x 7 fibres [i, :, j] is ranked on its own, not the 35 entries of a row."""
    for method in ("della", "della_linear"):
        for case in ("2x-count-norm", "5x-sum-norm-rescale"):
            ours, expected = _run_case(method, (3, 5, 7), CASES[case], _seed(case, (3, 5, 7)))
            ref.assert_matches(ours, expected)


def test_base_only_returns_base():
    """No expert at all (mergekit returns the base): every GTA method gives the base back."""
    base, _ = ref.family((5, 3), 0, 3)
    failures = {}
    for method in METHODS:
        try:
            ours = merge_tensors(method, [base], base_index=0, model_params=[{}])
            if not torch.equal(ours, base):
                failures[method] = "differs from the base"
        except Exception as exc:  # noqa: BLE001 - collect every method's failure in one report
            failures[method] = f"{type(exc).__name__}: {exc}"
    assert not failures, failures


def test_empty_tensor():
    """A tensor with 0 rows (shape [0, 5]) merges to an empty tensor of the same shape with every method."""
    base = torch.zeros(0, 5)
    three = [base, base + 1, base - 1]
    gta_mp = [{}, {"weight": 1.0, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    runs = {m: dict(tensors=three, base_index=0, model_params=gta_mp) for m in METHODS}
    runs["linear"] = dict(tensors=three, model_params=[{"weight": 1.0}] * 3)
    runs["slerp"] = dict(tensors=three[:2], base_index=0, params={"t": 0.5})
    runs["model_stock"] = dict(tensors=three, base_index=0)
    runs["sce"] = dict(tensors=three, base_index=0, params={"select_topk": 0.5})
    runs["passthrough"] = dict(tensors=three[:1])
    failures = {}
    for method, kw in runs.items():
        try:
            ours = merge_tensors(method, kw.pop("tensors"), **kw)
            if ours.shape != (0, 5):
                failures[method] = f"shape {tuple(ours.shape)}"
        except Exception as exc:  # noqa: BLE001 - collect every method's failure in one report
            failures[method] = f"{type(exc).__name__}: {exc}"
    assert not failures, failures


def test_task_arithmetic_bf16_inputs_are_widened():
    """Inputs of any float dtype are widened to fp32 before the math (the task vector is an fp32 difference)."""
    base, experts = ref.family((31, 17), 2, 5, base_scale=0.5)
    inputs = [t.to(torch.bfloat16) for t in (base, *experts)]
    ours = merge_tensors("task_arithmetic", inputs, base_index=0,
                         model_params=[{}, {"weight": 0.6}, {"weight": -1.1}], params={"lambda": 0.9})
    expected = ref.gta(inputs[0].float(), [x.float() for x in inputs[1:]], [0.6, -1.1], lam=0.9)
    ref.assert_matches(ours, expected)
