"""pymerge against mergekit 0.1.5 on the tiny synthetic Llama family, every tensor, every element.

Each test writes one mergekit YAML config (float32 inputs, ``dtype: float32``), merges it with mergekit and
with ``pymerge.merge``, and compares the two outputs: same tensor names, shapes and dtypes, and
``allclose(ours, ref, rtol=1e-6, atol=1e-7)`` for the deterministic methods.

Tolerance: both sides compute in fp32 (pymerge may widen small reductions to fp64), so they differ only by
rounding order. Against an fp64 evaluation of the same formulas, mergekit's outputs were off by at most
2.3e-7 absolute (2 ulp, on norm weights ~1) and used at most 0.17 of this tolerance on every method here.
rtol 1e-6 is ~8 fp32 ulp of the output; atol 1e-7 covers outputs near 0, whose error comes from rounding
terms of size ~0.02-1 (ulp 2e-9 - 1.2e-7). A wrong parameter (e.g. an off-by-one top-k, a missing λ, a
wrong t) moves elements by >= 1e-4, three orders of magnitude above it.

Random methods (dare_*, della*) draw different masks in pymerge (Philox) and mergekit (torch.bernoulli), so
they are checked by invariants, on both outputs: every output element must equal base + λ·(combination of
w_t·s_t·τ_t over *some* subset of experts, after sign election and normalisation as the method defines it),
and the decoded keep masks must follow the keep probabilities (density, or DELLA's rank-dependent
probability) within 6 standard deviations, both in count and in their correlation with |τ| rank; the L1
rescale factors s_t must match the decoded masks (exactly, for the linear variants).

Findings about mergekit 0.1.5, established empirically on this family (scratch runs against fp64
re-computations) while writing these tests:
- base_model not listed in `models`: mergekit adds it as an extra input with no parameters. Methods with a
  base role (task_arithmetic, ties, dare_*, breadcrumbs*, della*, slerp, model_stock, sce) give identical
  results whether the base is listed or not. `linear` has no base role: the base becomes one more input that
  needs a `weight`, and without one the merge fails ("Missing required parameter weight for <base>...").
  A listed base in `linear` is just another weighted input.
- `weight` has no default: a model without one is an error, for linear and the task-arithmetic family.
  `density` defaults to 1.0 (no trimming; `ties` then still elects signs, so it is not a plain mean);
  `gamma` 0.01; `epsilon` 0.15; `lambda` 1. Defaults (normalize, rescale): task_arithmetic (F, F),
  ties (T, F), dare_ties (F, T), dare_linear (F, T), breadcrumbs (F, F), breadcrumbs_ties (F, F),
  della (T, T), della_linear (F, T); linear normalize T (divides by Σw, no zero guard).
- rescale is L1 per tensor and model: masked τ · ‖τ‖₁/‖masked τ‖₁. DARE's density is the keep probability.
  DELLA keeps with p = density − ε + 2ε·rank/(n−1), rank of |τ| within each row (a 1-D tensor is one row).
  With sign consensus, `normalize` divides by Σ w over the experts kept and agreeing at that element (0 → 1);
  without consensus by Σ w over all experts.
- Gradients (list values): layer i of a slice of L layers is evaluated at t = i/(L−1) (t = 1 when L = 1),
  piecewise-linearly between the list's anchors. Filters are substring matches on the tensor name, the
  first matching entry wins, an entry without `filter` matches everything. Tensors outside the layers
  (embed_tokens, model.norm, lm_head) are all evaluated at t = 0, i.e. the first anchor, lm_head and the
  final norm included. Verified for SLERP's t and passthrough's scale.
- SLERP takes exactly the base plus one other model; t = 0 gives the base, whatever the list order. It runs
  in fp32; here the norm weights (cosine > 0.9995) take the linear branch and the matrices the spherical one.
- model_stock needs at least 3 inputs including the base (base + 2 experts); base + 1 expert is an error.
- passthrough takes one input per slice. Slices concatenate their layer ranges (the output config's
  num_hidden_layers is the total); embed_tokens comes from the first slice's source, model.norm and
  lm_head from the last slice's. `scale` multiplies the tensor (per source, with filters and gradients).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import yaml

from helpers.mergekit_runner import load_state, requires_mergekit, run_mergekit

pytestmark = requires_mergekit

RTOL, ATOL = 1e-6, 1e-7
Z_MAX = 6.0  # statistical checks: a correct implementation fails one with probability ~1e-9
SEED = 1234  # mergekit's random_seed for the random methods

W = (0.7, 1.3, -0.4)  # odd weights, one negative
DENSITY = (0.3, 0.55, 0.45)

State = Dict[str, torch.Tensor]
ConfigFn = Callable[[Any], dict]  # Family -> config dict


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run each test with one torch thread: every tensor here is tiny, and on a busy 2-core machine OpenMP
    workers spinning for each small op made the merges and checks 10-50x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------
# Configs


def _experts(family, **per_model: Sequence) -> List[dict]:
    """`models:` entries for the three experts, parameters given as one sequence per parameter name."""
    entries = []
    for i, path in enumerate(family.experts):
        params = {key: values[i] for key, values in per_model.items()}
        entries.append({"model": str(path), **({"parameters": params} if params else {})})
    return entries


def _gta(method: str, family, parameters: Optional[dict] = None, **per_model: Sequence) -> dict:
    config = {
        "merge_method": method,
        "base_model": str(family.base),
        "dtype": "float32",
        "models": _experts(family, **per_model),
    }
    if parameters:
        config["parameters"] = parameters
    return config


DETERMINISTIC_CASES: Dict[str, ConfigFn] = {
    # The base is listed with its own weight: linear has no base role, so it is a plain input.
    "linear_normalize": lambda f: {
        "merge_method": "linear",
        "base_model": str(f.base),
        "dtype": "float32",
        "models": _experts(f, weight=W) + [{"model": str(f.base), "parameters": {"weight": 0.25}}],
    },
    "linear_no_normalize": lambda f: {
        "merge_method": "linear",
        "dtype": "float32",
        "parameters": {"normalize": False},
        "models": _experts(f, weight=W),
    },
    "task_arithmetic_lambda": lambda f: _gta("task_arithmetic", f, {"lambda": 0.85}, weight=W),
    "ties": lambda f: _gta("ties", f, {"lambda": 1.1}, weight=W, density=DENSITY),
    "ties_rescale_no_normalize": lambda f: _gta(
        "ties", f, {"normalize": False, "rescale": True, "lambda": 0.9}, weight=W, density=DENSITY
    ),
    "breadcrumbs": lambda f: _gta("breadcrumbs", f, {"gamma": 0.05}, weight=W, density=DENSITY),
    "breadcrumbs_ties": lambda f: _gta(
        "breadcrumbs_ties", f, {"lambda": 1.2}, weight=W, density=DENSITY, gamma=(0.02, 0.08, 0.04)
    ),
    "slerp_scalar": lambda f: {
        "merge_method": "slerp",
        "base_model": str(f.base),
        "dtype": "float32",
        "models": [{"model": str(f.experts[0])}],  # base not listed: mergekit adds it
        "parameters": {"t": 0.3},
    },
    "slerp_gradient_filters": lambda f: {
        "merge_method": "slerp",
        "base_model": str(f.base),
        "dtype": "float32",
        "models": [{"model": str(f.experts[1])}, {"model": str(f.base)}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                {"filter": "mlp", "value": [0.9, 0.15]},
                {"value": [0.35, 0.65]},  # norms in layers get a per-layer t; embed/lm_head/norm get 0.35
            ]
        },
    },
    "model_stock": lambda f: _gta("model_stock", f),
    "model_stock_filter_wise": lambda f: _gta("model_stock", f, {"filter_wise": True}),
    "sce_topk_1": lambda f: _gta("sce", f, {"select_topk": 1.0}),
    "sce_topk_half": lambda f: _gta("sce", f, {"select_topk": 0.5}),
    "passthrough_slices_scale": lambda f: {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": str(f.experts[0]), "layer_range": [0, 2]}]},
            {
                "sources": [
                    {
                        "model": str(f.experts[1]),
                        "layer_range": [1, 3],
                        "parameters": {
                            "scale": [
                                {"filter": "o_proj", "value": 0.5},
                                {"filter": "down_proj", "value": -1.5},
                                {"value": 1.0},
                            ]
                        },
                    }
                ]
            },
        ],
    },
    "passthrough_scale_gradient": lambda f: {
        "merge_method": "passthrough",
        "dtype": "float32",
        "models": [{"model": str(f.experts[2])}],
        "parameters": {"scale": [0.5, 2.0]},
    },
}


@dataclass(frozen=True)
class RandomSpec:
    """What a task-arithmetic-family random method computes (see the module docstring)."""

    consensus: bool
    normalize: bool
    rescale: bool
    lam: float
    density: Tuple[float, ...]
    epsilon: Optional[Tuple[float, ...]] = None  # DELLA only


RANDOM_CASES: Dict[str, Tuple[ConfigFn, RandomSpec]] = {
    "dare_linear_exact": (
        lambda f: _gta("dare_linear", f, {"rescale": False, "normalize": False}, weight=W, density=DENSITY),
        RandomSpec(consensus=False, normalize=False, rescale=False, lam=1.0, density=DENSITY),
    ),
    "dare_linear_rescale": (
        lambda f: _gta("dare_linear", f, {"lambda": 0.8}, weight=W, density=DENSITY),
        RandomSpec(consensus=False, normalize=False, rescale=True, lam=0.8, density=DENSITY),
    ),
    "dare_ties": (
        lambda f: _gta("dare_ties", f, {"lambda": 0.9}, weight=W, density=DENSITY),
        RandomSpec(consensus=True, normalize=False, rescale=True, lam=0.9, density=DENSITY),
    ),
    "della": (
        lambda f: _gta("della", f, {"lambda": 0.9}, weight=W, density=DENSITY, epsilon=(0.15, 0.1, 0.2)),
        RandomSpec(
            consensus=True, normalize=True, rescale=True, lam=0.9, density=DENSITY, epsilon=(0.15, 0.1, 0.2)
        ),
    ),
    "della_linear": (
        lambda f: _gta("della_linear", f, {"epsilon": 0.1, "rescale": False}, weight=W, density=DENSITY),
        RandomSpec(
            consensus=False, normalize=False, rescale=False, lam=1.0, density=DENSITY, epsilon=(0.1,) * 3
        ),
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Running both sides


def _write_config(config: dict, tmp_path: Path) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _run_pymerge(config_path: Path, out_dir: Path) -> Path:
    import pymerge

    pymerge.merge(config_path, out_dir, quiet=True)
    return out_dir


def _run_both(config: dict, tmp_path: Path, *, seed: Optional[int] = None) -> Tuple[Path, Path]:
    """Merge ``config`` with mergekit, then pymerge; return (ours, reference) output directories."""
    config_path = _write_config(config, tmp_path)
    ref_dir = run_mergekit(
        config_path, tmp_path / "mergekit", extra_options={"random_seed": seed} if seed is not None else None
    )
    ours_dir = _run_pymerge(config_path, tmp_path / "pymerge")
    return ours_dir, ref_dir


def _assert_same_layout(ours: State, ref: State) -> None:
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    assert not missing and not extra, f"tensor names differ from mergekit: missing {missing}, unexpected {extra}"
    bad = [
        f"{name}: ours {tuple(ours[name].shape)} {ours[name].dtype}, mergekit {tuple(t.shape)} {t.dtype}"
        for name, t in ref.items()
        if ours[name].shape != t.shape or ours[name].dtype != t.dtype
    ]
    assert not bad, "shape/dtype mismatches:\n" + "\n".join(bad)


def _assert_states_close(ours: State, ref: State, skip: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """allclose on every element, except where ``skip[name]`` (a bool mask) marks a legitimately free choice."""
    failures = []
    for name, expected in ref.items():
        got = ours[name]
        err = (got.double() - expected.double()).abs()
        excess = err - RTOL * expected.double().abs()
        bad = excess > ATOL
        if skip is not None and name in skip:
            bad &= ~skip[name].reshape(bad.shape)
        if bad.any():
            worst = int(torch.where(bad, excess, torch.zeros_like(excess)).argmax())
            failures.append(
                f"{name}: {int(bad.sum())}/{err.numel()} elements out of tolerance, max |diff| "
                f"{float(err[bad].max()):.3e}; flat index {worst}: ours {float(got.flatten()[worst]):.9g} vs "
                f"mergekit {float(expected.flatten()[worst]):.9g}"
            )
    assert not failures, "outputs differ from mergekit:\n" + "\n".join(failures)


def _model_param(config: dict, index: int, key: str, default: float) -> float:
    """A scalar parameter of the index-th `models` entry: its own value, else the shared one, else default."""
    for scope in (config["models"][index].get("parameters") or {}, config.get("parameters") or {}):
        if key in scope:
            assert isinstance(scope[key], (int, float)), "only scalar parameters are supported here"
            return float(scope[key])
    return default


def _tied_at_cut(values: torch.Tensor, cuts: Sequence[int]) -> torch.Tensor:
    """Mask of the entries whose value equals the values on both sides of a cut in ascending order.

    Keeping "the k largest" is ambiguous when equal values straddle the cut; mergekit then keeps whichever
    its sort puts first, pymerge the lowest flat index. Both are right, so these entries are not compared.
    """
    flat = values.reshape(-1)
    ordered = flat.sort().values
    mask = torch.zeros_like(flat, dtype=torch.bool)
    for cut in cuts:
        if 0 < cut < flat.numel() and ordered[cut - 1] == ordered[cut]:
            mask |= flat == ordered[cut]
    return mask


def _ambiguous_topk_entries(config: dict, base: State, experts: List[State]) -> Dict[str, torch.Tensor]:
    """Per tensor, the output entries where a top-k selection of this config has tied values at its cut.

    Task vectors are fp32 differences of weights ~0.02, so they lie on a grid of ~2e-9 and exact ties
    happen (about one pair per tensor): rarely at a cut, but then the choice of survivor is free.
    """
    method = config["merge_method"]
    if method not in ("ties", "breadcrumbs", "breadcrumbs_ties", "sce"):
        return {}
    skip = {}
    for name, b in base.items():
        taus = [e[name] - b for e in experts]
        n = b.numel()
        mask = torch.zeros(n, dtype=torch.bool)
        if method == "sce":
            var = torch.stack(taus).var(0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * float(config["parameters"]["select_topk"]))
            mask |= _tied_at_cut(var.abs(), [n - k])
        for i, tau in enumerate(taus if method != "sce" else []):
            density = _model_param(config, i, "density", 1.0)
            if density >= 1:
                continue
            if method == "ties":  # keeps the k = max(1, ⌊density·n⌋) largest |τ|
                cuts = [n - max(1, int(density * n))]
            else:  # drops the ⌊gamma·n⌋ largest, keeps the next ⌊density·n⌋
                kept, top = int(density * n), int(_model_param(config, i, "gamma", 0.01) * n)
                bottom = max(0, n - kept - top)
                cuts = [bottom, bottom + kept]
            mask |= _tied_at_cut(tau.abs(), cuts)
        if mask.any():
            skip[name] = mask
    return skip


_CONFIG_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)


def _assert_same_config(ours_dir: Path, ref_dir: Path) -> None:
    ours = json.loads((ours_dir / "config.json").read_text())
    ref = json.loads((ref_dir / "config.json").read_text())
    diff = {k: (ours.get(k), ref.get(k)) for k in _CONFIG_KEYS if ours.get(k) != ref.get(k)}
    assert not diff, f"config.json fields differ from mergekit (ours, mergekit): {diff}"


@pytest.mark.parametrize("case", sorted(DETERMINISTIC_CASES))
def test_matches_mergekit(case: str, tiny_family, tmp_path: Path) -> None:
    config = DETERMINISTIC_CASES[case](tiny_family)
    ours_dir, ref_dir = _run_both(config, tmp_path)
    ours, ref = load_state(ours_dir), load_state(ref_dir)
    _assert_same_layout(ours, ref)
    skip = _ambiguous_topk_entries(
        config, load_state(tiny_family.base), [load_state(p) for p in tiny_family.experts]
    )
    skipped = sum(int(m.sum()) for m in skip.values())
    assert skipped <= 10, f"{skipped} entries are tied at a top-k cut: the test data no longer tests much"
    _assert_states_close(ours, ref, skip)
    _assert_same_config(ours_dir, ref_dir)


# ----------------------------------------------------------------------------------------------------------
# Random methods: invariants


def _rank_fraction(tau: torch.Tensor) -> torch.Tensor:
    """rank(|τ|)/(n−1) within each row (a 1-D tensor is one row), flattened: 0 = smallest, 1 = largest."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.reshape(tau.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    return (ranks / max(rows.shape[1] - 1, 1)).reshape(-1)


def _estimate_scale(delta: torch.Tensor, single: torch.Tensor, min_count: int = 4) -> Optional[float]:
    """The common value of delta/single where only one expert contributes: the densest cluster of ratios.

    ``delta`` is out − base, ``single`` what a lone expert would contribute with s = 1. Returns None when no
    ratio occurs at least ``min_count`` times (to 1e-4 relative), which happens on tiny 1-D tensors.
    """
    usable = (single.abs() > 1e-5) & (delta != 0)
    ratio = delta[usable] / single[usable]
    logs = ratio[ratio > 0].log().sort().values
    if logs.numel() < min_count:
        return None
    ends = torch.searchsorted(logs, logs + 2e-4, right=True)
    counts = ends - torch.arange(logs.numel())
    start = int(counts.argmax())
    if int(counts[start]) < min_count:
        return None
    return float(logs[start : int(ends[start])].median().exp())


@dataclass
class _Tally:
    """Observed vs expected sums of independent Bernoulli indicators, as a z-score."""

    observed: float = 0.0
    expected: float = 0.0
    variance: float = 0.0

    def add(self, observed: torch.Tensor, prob: torch.Tensor, weight: Optional[torch.Tensor] = None) -> None:
        w = torch.ones_like(prob) if weight is None else weight
        self.observed += float((w * observed.double()).sum())
        self.expected += float((w * prob).sum())
        self.variance += float((w * w * prob * (1 - prob)).sum())

    def z(self) -> float:
        return (self.observed - self.expected) / math.sqrt(max(self.variance, 1e-300))


def _lone_divisor(spec: RandomSpec, weights: torch.Tensor, i: int) -> float:
    """The `normalize` divisor at an entry where expert i alone contributes."""
    if not spec.normalize:
        return 1.0
    if spec.consensus:  # Σ w over the kept, agreeing experts
        return float(weights[i]) if weights[i] != 0 else 1.0
    total = float(weights.sum())  # Σ w over all experts
    return total if abs(total) >= 1e-8 else 1.0


def _subset_outcomes(
    spec: RandomSpec, base: torch.Tensor, tau: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor,
    prob: torch.Tensor, subsets: List[Tuple[bool, ...]],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each subset S of experts whose entry survives the random drop, at every entry (all fp64):
    the merged value, which experts then contribute (after the sign election), and P(S).

    Shapes: base (N,), tau/prob (E, N) -> values (S, N), contributing (S, E, N), probability (S, N).
    """
    terms = (weights * scale)[:, None] * tau  # (E, N): w_t s_t τ_t, what sign election and sums see
    values, contribs, probs = [], [], []
    for subset in subsets:
        member = torch.tensor(subset)[:, None].expand_as(tau)
        if spec.consensus:
            elected = torch.where((terms * member).sum(0) >= 0, 1.0, -1.0).double()
            contrib = member & (terms.sign() == elected)
        else:
            contrib = member.clone()
        summed = (terms * contrib).sum(0)
        if spec.normalize and spec.consensus:
            divisor = (weights[:, None] * contrib).sum(0)
            summed = summed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        elif spec.normalize:
            summed = summed / _lone_divisor(spec, weights, 0)
        values.append(base + spec.lam * summed)
        contribs.append(contrib)
        probs.append(torch.where(member, prob, 1 - prob).prod(0))
    return torch.stack(values), torch.stack(contribs), torch.stack(probs)


def _check_random_merge(state: State, base: State, experts: List[State], spec: RandomSpec, who: str) -> str:
    """Assert the invariants of a random task-arithmetic-family merge on ``state``; return a summary."""
    n_exp = len(experts)
    weights = torch.tensor(W, dtype=torch.float64)
    subsets = list(itertools.product((False, True), repeat=n_exp))
    keep = [_Tally() for _ in range(n_exp)]
    keep_by_rank = [_Tally() for _ in range(n_exp)]
    untouched = _Tally()
    problems: List[str] = []
    skipped: List[str] = []
    rescale_chi2: List[float] = []  # squared z-scores of the rescale factors, where masks are partly hidden

    for name, base_t in base.items():
        out = state[name].double().reshape(-1)
        b = base_t.double().reshape(-1)
        taus = [(e[name] - base_t) for e in experts]  # fp32 differences, like both implementations
        rank = [_rank_fraction(t) for t in taus]
        tau = torch.stack([t.double().reshape(-1) for t in taus])  # (E, N)
        if spec.epsilon is None:
            prob = torch.stack([torch.full_like(rank[i], spec.density[i]) for i in range(n_exp)])
        else:
            prob = torch.stack(
                [spec.density[i] - spec.epsilon[i] + 2 * spec.epsilon[i] * rank[i] for i in range(n_exp)]
            )

        scale = torch.ones(n_exp, dtype=torch.float64)
        if spec.rescale:
            estimates = [
                _estimate_scale(out - b, spec.lam * float(weights[i]) * tau[i] / _lone_divisor(spec, weights, i))
                for i in range(n_exp)
            ]
            if any(s is None for s in estimates):
                if base_t.dim() >= 2:
                    problems.append(f"{name}: no consistent L1 rescale factor found for some expert")
                skipped.append(name)
                continue
            scale = torch.tensor(estimates, dtype=torch.float64)

        values_t, contribs_t, probs_t = _subset_outcomes(spec, b, tau, weights, scale, prob, subsets)

        err = (values_t - out).abs()
        best = err.argmin(0)
        residual = err.gather(0, best[None])[0]
        tol = ATOL + RTOL * out.abs()
        bad = residual > tol
        if bad.any():
            worst = int((residual - tol).argmax())
            problems.append(
                f"{name}: {int(bad.sum())}/{out.numel()} elements are not base + λ·(a combination of kept "
                f"task vectors); flat index {worst}: value {float(out[worst]):.9g}, nearest candidate "
                f"{float(values_t[best[worst], worst]):.9g}"
            )
            continue

        observed = contribs_t[best, :, torch.arange(out.numel())].T  # (E, N) decoded contributions
        expected = (probs_t[:, None, :] * contribs_t).sum(0)  # (E, N) P(expert t contributes)
        for i in range(n_exp):
            keep[i].add(observed[i], expected[i])
            keep_by_rank[i].add(observed[i], expected[i], weight=rank[i] - 0.5)
        none_expected = (probs_t * ~contribs_t.any(1)).sum(0)
        untouched.add(~observed.any(0), none_expected)

        if spec.rescale:
            # s_t = ‖τ_t‖₁ / ‖m_t τ_t‖₁ with the keep mask m_t. Given the decoded contributions, each m_t[i] is
            # either known (kept and visible, or dropped where it would have been visible) or, for an entry
            # that would have lost the sign election, Bernoulli with its posterior probability. So ‖m_t τ_t‖₁
            # has a known conditional mean and variance: exact when nothing is hidden (no consensus).
            members = torch.tensor(subsets)  # (S, E)
            consistent = (contribs_t == observed[None]).all(1)  # (S, N): subsets that explain the output
            weight_s = probs_t * consistent
            posterior = (weight_s[:, None, :] * members[:, :, None]).sum(0) / weight_s.sum(0)  # (E, N)
            for i in range(n_exp):
                kept_l1 = float(tau[i].abs().sum() / scale[i])
                mean = float((tau[i].abs() * posterior[i]).sum())
                std = float((tau[i] ** 2 * posterior[i] * (1 - posterior[i])).sum().sqrt())
                slack = Z_MAX * std + 1e-5 * mean  # 1e-5: rounding of the scale estimate and of the sums
                if abs(kept_l1 - mean) > slack:
                    problems.append(
                        f"{name}: expert {i}: rescale factor {float(scale[i]):.7g} implies ‖kept τ‖₁ = "
                        f"{kept_l1:.7g}, but the decoded keep mask gives {mean:.7g} ± {std:.2g}"
                    )
                if std > 0:
                    rescale_chi2.append(((kept_l1 - mean) / std) ** 2)

    assert not problems, f"{who}: random-merge invariants violated:\n" + "\n".join(problems[:20])
    assert len(skipped) <= len(base) // 2, f"{who}: too many tensors could not be decoded: {skipped}"
    zs = {f"keep[{i}]": keep[i].z() for i in range(n_exp)}
    zs.update({f"keep_by_rank[{i}]": keep_by_rank[i].z() for i in range(n_exp)})
    zs["untouched"] = untouched.z()
    if rescale_chi2:  # many individually plausible factors can still be jointly off (e.g. 1/density)
        k = len(rescale_chi2)
        zs["rescale_chi2"] = (sum(rescale_chi2) - k) / math.sqrt(2 * k)
    outliers = {k: round(v, 2) for k, v in zs.items() if not abs(v) < Z_MAX}
    assert not outliers, (
        f"{who}: keep statistics off by more than {Z_MAX} sigma: {outliers} "
        f"(keep observed/expected: {[(round(t.observed), round(t.expected)) for t in keep]})"
    )
    return ", ".join(f"{k}={v:+.2f}" for k, v in zs.items())


@pytest.mark.parametrize("case", sorted(RANDOM_CASES))
def test_random_method_invariants(case: str, tiny_family, tmp_path: Path) -> None:
    config_fn, spec = RANDOM_CASES[case]
    config = config_fn(tiny_family)
    base = load_state(tiny_family.base)
    experts = [load_state(p) for p in tiny_family.experts]

    config_path = _write_config(config, tmp_path)
    ref_dir = run_mergekit(config_path, tmp_path / "mergekit", extra_options={"random_seed": SEED})
    ref = load_state(ref_dir)
    # The reference must satisfy our model of the method; if it does not, this test's model is wrong.
    _check_random_merge(ref, base, experts, spec, who="mergekit")

    ours_dir = _run_pymerge(config_path, tmp_path / "pymerge")
    ours = load_state(ours_dir)
    _assert_same_layout(ours, ref)
    _check_random_merge(ours, base, experts, spec, who="pymerge")
    _assert_same_config(ours_dir, ref_dir)
