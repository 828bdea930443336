"""Float64 oracles of pymerge's merge methods, written from the formulas (methods.md §A-B, mergekit 0.1.5).

The oracles follow mergekit's semantics plus pymerge's documented deliberate differences:
  * top-k keeps exactly k; ties at the threshold go to the lowest flat index (a float64 *stable* sort);
  * DARE/DELLA keep-masks are inputs of the oracles: the tests draw the uniforms from the Philox stream (whose
    bits tests/ops pins with known-answer vectors) and the oracles only say what a mask does to the merge;
  * DELLA ranks are stable ascending ranks along dim 1 (mergekit's axis; a tensor of < 2 dims is one row), and
    a one-element row gets rank ratio 0 (mergekit would compute 0/0).

Every oracle returns ``Ref(value, scale)``: the float64 result and, per element, the magnitude of the terms it
is built from. An fp32 implementation makes a bounded number of roundings of relative size 2**-24 per term, so
it must agree with ``value`` to a small multiple of 2**-24 * scale whatever cancellation happens in ``value``.

The data helpers at the end build fp32 inputs whose task vectors are exact in fp32 (values on a 2**-20 grid), so
the oracle's float64 task vectors, and hence every ordering and tie, are exactly the ones pymerge sees.
Where a float64 decision could legitimately differ from an fp32 one (an election sum within 1e-5 of zero, two
variances within 1e-5 at a top-k threshold, a DELLA probability within 1e-6 of its uniform), the oracle refuses
the data with ``OracleDomainError`` instead of guessing: pick another seed.

Nothing here calls pymerge's methods; ``philox_uniform`` reads the raw Philox words.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

F64 = torch.float64

RESCALE_EPS = 1e-7  # mergekit's rescaled_masked_tensor: an L1 norm below this means "do not rescale"
NORM_EPS = 1e-8  # mergekit's slerp: a norm at or below this counts as 1
SLERP_DOT_THRESHOLD = 0.9995  # mergekit's slerp: above this |cos| the result is the linear blend
DELLA_AMBIGUITY = 1e-6  # |u - p| below this: fp32 p and float64 p may decide u < p differently

# Tolerance of fp32 results against the float64 oracles, relative to ``Ref.scale``. The fp32 unit roundoff is
# 2**-24 ~ 6e-8. The longest fp32 chain in any method (rescale factor, weight, a sum over up to 5 experts, a
# divisor summed from up to 5 weights, the division, lambda, the base add) is ~15 roundings, each bounded by
# 2**-24 times a magnitude that ``scale`` accounts for, so 2e-6 (~33 roundings) leaves a 2x margin; a wrong
# element (a dropped or extra task-vector entry, a wrong sign election) is off by O(|tau|), 1e5 times more.
REL = 2e-6


class OracleDomainError(AssertionError):
    """The test data sits where a float64 oracle cannot stand in for fp32 math: choose another seed."""


class Ref(NamedTuple):
    value: torch.Tensor  # float64 result
    scale: torch.Tensor  # float64, per element: sum of the magnitudes of the terms of ``value``


def assert_matches(ours: torch.Tensor, ref: Ref, rel: float = REL) -> None:
    """Every element of ``ours`` equals ``ref.value`` within ``rel`` relative and ``rel * max(scale)`` absolute."""
    assert tuple(ours.shape) == tuple(ref.value.shape), (tuple(ours.shape), tuple(ref.value.shape))
    atol = rel * float(ref.scale.max()) if ref.scale.numel() else 0.0
    torch.testing.assert_close(ours.double(), ref.value, rtol=rel, atol=atol)


# --------------------------------------------------------------------------------------------------------------
# Selection (magnitude top-k, breadcrumbs' two cut-offs) by float64 stable sorting
# --------------------------------------------------------------------------------------------------------------

def descending_order(x: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``x`` by decreasing |x|; equal magnitudes keep increasing index order (stable sort)."""
    return torch.sort(x.reshape(-1).to(F64).abs(), descending=True, stable=True).indices


def topk_keep(x: torch.Tensor, k: int, keep_all_ties: bool = False) -> torch.Tensor:
    """Mask of the k largest |x|, lowest flat index first among equal magnitudes (or every element tied with
    the k-th largest when ``keep_all_ties``)."""
    mags = x.reshape(-1).to(F64).abs()
    n = mags.numel()
    k = max(0, min(int(k), n))
    keep = torch.zeros(n, dtype=torch.bool)
    if k:
        order = descending_order(x)
        keep[order[:k]] = True
        if keep_all_ties:
            keep |= mags >= mags[order[k - 1]]
    return keep.reshape(x.shape)


def magnitude_keep(tau: torch.Tensor, density: float) -> torch.Tensor:
    """mergekit's ``magnitude``: all if d >= 1, none if d <= 0, else the top max(1, int(d*n)) magnitudes."""
    n = tau.numel()
    if density >= 1:
        return torch.ones(tau.shape, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros(tau.shape, dtype=torch.bool)
    return topk_keep(tau, max(1, int(density * n)))


def outlier_keep(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's ``magnitude_outliers`` (breadcrumbs): in ascending magnitude order keep positions
    [n_bot, n_bot + target), target = int(d*n), n_top = int(gamma*n), n_bot = max(0, n - target - n_top).

    The ascending order is the reverse of ``descending_order``: the same total order as top-k's, in which a
    lower flat index counts as the larger of two equal magnitudes, so both cut-offs break ties like top-k.
    """
    n = tau.numel()
    if density >= 1:
        return torch.ones(tau.shape, dtype=torch.bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    ascending = descending_order(tau).flip(0)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[ascending[n_bot:n_bot + target]] = True
    return keep.reshape(tau.shape)


# --------------------------------------------------------------------------------------------------------------
# Random masks: Philox uniforms (raw words) and DELLA's probabilities
# --------------------------------------------------------------------------------------------------------------

def philox_uniform(seed: int, model: int, name: str, shape: Sequence[int]) -> torch.Tensor:
    """u = (word >> 8) / 2**24 in float64 for every flat element of one model's tensor (stream of philox.py)."""
    from pymerge.ops.philox import random_words

    n = math.prod(shape)
    return ((random_words(seed, model, name, 0, n) >> 8).to(F64) / float(1 << 24)).reshape(tuple(shape))


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = (d - eps) + 2 eps * r / (m - 1), r the stable ascending rank of |tau| along dim 1 (a tensor of
    < 2 dims is one row), m the length of that dim; r / (m - 1) is 0 when m = 1."""
    t = tau.to(F64)
    if t.dim() < 2:
        t = t.reshape(1, -1)
    m = t.shape[1]
    order = torch.sort(t.abs(), dim=1, stable=True).indices
    ranks = torch.argsort(order, dim=1).to(F64)  # inverse permutation: the rank of each element
    ratio = ranks / (m - 1) if m > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + 2 * epsilon * ratio).reshape(tau.shape)


def della_keep(tau: torch.Tensor, density: float, epsilon: float, u: torch.Tensor) -> torch.Tensor:
    """DELLA keep-mask u < p (all for d >= 1, none for d <= 0); refuses u within 1e-6 of its p."""
    if density >= 1:
        return torch.ones(tau.shape, dtype=torch.bool)
    if density <= 0:
        return torch.zeros(tau.shape, dtype=torch.bool)
    p = della_probabilities(tau, density, epsilon)
    close = (u - p).abs() <= DELLA_AMBIGUITY
    if close.any():
        raise OracleDomainError(f"{int(close.sum())} DELLA uniforms within {DELLA_AMBIGUITY} of their probability")
    return u < p


# --------------------------------------------------------------------------------------------------------------
# Generalized task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*)
# --------------------------------------------------------------------------------------------------------------

def l1_rescale(tau: torch.Tensor, keep: torch.Tensor) -> float:
    """mergekit's L1 rescale factor ||tau||_1 / ||keep*tau||_1, or 1 when either norm is below 1e-7."""
    before = float(tau.to(F64).abs().sum())
    after = float((tau.to(F64) * keep).abs().sum())
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


def elect(deltas: torch.Tensor, method: str, strict: bool = True) -> torch.Tensor:
    """agree[t] = sgn(deltas[t]) == gamma with gamma = +1 where sum_t deltas[t] >= 0 ("sum") or
    sum_t sgn(deltas[t]) >= 0 ("count"), else -1. Zero deltas never agree.

    ``strict``: refuse sums within 1e-5 of zero relative to their terms (including exact zeros made of nonzero
    terms), where fp32 rounding of the weighted deltas may flip the election.
    """
    sign = deltas.sign()
    if method == "sum":
        total = deltas.sum(dim=0)
        if strict:
            close = total.abs() < 1e-5 * deltas.abs().sum(dim=0)
            if close.any():
                raise OracleDomainError(f"{int(close.sum())} sign-election sums within 1e-5 of zero")
    elif method == "count":
        total = sign.sum(dim=0)
    else:
        raise ValueError(method)
    gamma = torch.where(total >= 0, 1.0, -1.0).to(F64)
    return sign == gamma


def gta(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], *,
        keeps: Sequence[torch.Tensor | None] | None = None, rescale: bool = False, consensus: str | None = None,
        normalize: bool = False, lam: float = 1.0, strict_election: bool = True) -> Ref:
    """theta_0 + lam * M with, for task vectors tau_t = theta_t - theta_0 and keep-masks k_t (None: untouched),
        d_t   = w_t * s_t * k_t * tau_t      (s_t: L1 rescale factor when ``rescale`` and k_t is given, else 1)
        consensus:  a_t = elect(d)[t],  M = sum_t a_t d_t  /  (sum_t a_t w_t,  0 -> 1)
        none:       M = sum_t d_t       /  (sum_t w_t,      |.| < 1e-8 -> 1)
    with the division only when ``normalize``.
    """
    b = base.to(F64)
    taus = [e.to(F64) - b for e in experts]
    for t, keep in enumerate(keeps or []):
        if keep is not None:
            s = l1_rescale(taus[t], keep) if rescale else 1.0
            taus[t] = taus[t] * keep * s
    w = torch.tensor([float(x) for x in weights], dtype=F64).reshape(-1, *[1] * b.dim())
    deltas = torch.stack(taus) * w if taus else torch.zeros((0, *b.shape), dtype=F64)
    if consensus:
        agree = elect(deltas, consensus, strict_election).to(F64)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        terms = (deltas.abs() * agree).sum(dim=0)
        w_terms = (w.abs() * agree).sum(dim=0)
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0).expand(b.shape) if taus else torch.zeros(b.shape, dtype=F64)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
        terms = deltas.abs().sum(dim=0)
        w_terms = w.abs().sum(dim=0).expand(b.shape) if taus else torch.zeros(b.shape, dtype=F64)
    if normalize:
        mixed = mixed / divisor
        # a divisor summed with cancellation carries a relative error ~ u * sum|w| / |divisor|
        terms = terms / divisor.abs() * (1 + w_terms / divisor.abs())
    return Ref(b + lam * mixed, b.abs() + abs(lam) * terms)


# --------------------------------------------------------------------------------------------------------------
# Linear, SLERP, Model Stock, SCE, passthrough
# --------------------------------------------------------------------------------------------------------------

def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> Ref:
    """sum_i w_i x_i / sum_i w_i (or without the division)."""
    xs = torch.stack([x.to(F64) for x in tensors])
    w = torch.tensor([float(x) for x in weights], dtype=F64).reshape(-1, *[1] * (xs.dim() - 1))
    value = (w * xs).sum(dim=0)
    scale = (w * xs).abs().sum(dim=0)
    if normalize:
        s = float(sum(float(x) for x in weights))
        value = value / s
        scale = scale / abs(s) * (1 + sum(abs(float(x)) for x in weights) / abs(s))
    return Ref(value, scale)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> Ref:
    """c_a a + c_b b with, for d = <a, b> / (|a| |b|) (norms <= 1e-8 count as 1, d clamped to [-1, 1]):
    |d| > 0.9995: c_a = 1 - t, c_b = t;  else Omega = acos d, c_a = sin((1-t) Omega)/sin Omega,
    c_b = sin(t Omega)/sin Omega."""
    a64, b64 = a.to(F64), b.to(F64)
    na, nb = float(a64.norm()), float(b64.norm())
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    d = max(-1.0, min(1.0, float((a64 * b64).sum()) / (na * nb)))
    if abs(abs(d) - SLERP_DOT_THRESHOLD) < 1e-9:
        raise OracleDomainError(f"slerp: |cos| = {abs(d)} is at the linear-blend switch")
    if abs(d) > SLERP_DOT_THRESHOLD:
        ca, cb = 1.0 - t, t
    else:
        omega = math.acos(d)
        ca, cb = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return Ref(ca * a64 + cb * b64, (ca * a64).abs() + (cb * b64).abs())


def model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor], filter_wise: bool = False) -> Ref:
    """t * mean_i(theta_i) + (1 - t) * theta_0 with t = N c / (1 + (N - 1) c) (0 where |1 + (N-1) c| < 1e-6),
    c the mean over pairs i < j of clamp(<tau_i, tau_j> / max(|tau_i| |tau_j|, 1e-6), -1, 1), computed over the
    flattened tensor, or per vector along the last dim when ``filter_wise``."""
    def view(x: torch.Tensor) -> torch.Tensor:
        x = x.to(F64)
        if filter_wise:
            return x.reshape(-1, x.shape[-1]) if x.dim() >= 1 else x.reshape(1, 1)
        return x.reshape(1, -1)

    b = view(base)
    ws = [view(e) for e in experts]
    taus = [w - b for w in ws]
    n = len(ws)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = taus[i].norm(dim=-1) * taus[j].norm(dim=-1)
            cos.append(((taus[i] * taus[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    t = t.unsqueeze(-1)
    avg = sum(ws) / n
    value = t * avg + (1 - t) * b
    scale = t.abs() * sum(w.abs() for w in ws) / n + (1 - t).abs() * b.abs() + t.abs() * b.abs()
    return Ref(value.reshape(base.shape), scale.reshape(base.shape))


def sce(base: torch.Tensor, experts: Sequence[torch.Tensor], select_topk: float = 1.0,
        guard_ties: bool = True) -> Ref:
    """SCE: theta_0 + sum_t c_t e_t s_t / max(sum_t c_t e_t, 1e-6) where
        s_t = tau_t * m  with m the top int(select_topk * #nonzero(var)) of the population variance over t
              (lowest index first among ties; m = 0 for select_topk <= 0, m = 1 for select_topk >= 1),
        c_t = mean(s_t^2) / sum_t mean(s_t^2)   (1/T when |sum| < 1e-6),
        e_t = sgn(s_t) == gamma, gamma from the unweighted sum election.
    ``guard_ties``: refuse data whose k-th and (k+1)-th variances are within 1e-5 (fp32 variances may order
    them differently); turn it off only for data whose fp32 variances are exact.
    """
    b = base.to(F64)
    taus = torch.stack([e.to(F64) - b for e in experts])
    n_exp = taus.shape[0]
    if select_topk <= 0:
        sel = torch.zeros_like(taus)
    elif select_topk < 1:
        var = taus.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        v = torch.sort(var.reshape(-1), descending=True).values
        if guard_ties and 0 < k < v.numel() and v[k - 1] - v[k] <= 1e-5 * v[k - 1]:
            raise OracleDomainError(f"sce: variances {float(v[k - 1])} and {float(v[k])} straddle the top-{k} cut")
        sel = taus * topk_keep(var, k)
    else:
        sel = taus
    energy = (sel ** 2).reshape(n_exp, -1).mean(dim=1) if b.numel() else torch.zeros(n_exp, dtype=F64)
    total = float(energy.sum())
    c = torch.full((n_exp,), 1.0 / n_exp, dtype=F64) if abs(total) < 1e-6 else energy / total
    c = c.reshape(-1, *[1] * b.dim())
    weights = c * elect(sel, "sum", strict=guard_ties).to(F64)
    den = weights.sum(dim=0).clamp(min=1e-6)
    return Ref(b + (sel * weights).sum(dim=0) / den, b.abs() + 2 * (sel.abs() * weights).sum(dim=0) / den)


def passthrough(x: torch.Tensor, scale: float | None = None) -> Ref:
    """x, or x * scale."""
    v = x.to(F64) if scale is None else x.to(F64) * float(scale)
    return Ref(v, v.abs())


# --------------------------------------------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------------------------------------------

GRID_BITS = 20
LIMIT = 7.9


def on_grid(x: torch.Tensor) -> torch.Tensor:
    """x rounded to multiples of 2**-20 inside (-8, 8), as fp32 (exact). The sum or difference of two such
    values is a multiple of 2**-20 below 16 in magnitude, i.e. < 2**24 units: exact in fp32."""
    scaled = (x.to(F64).clamp(-LIMIT, LIMIT) * (1 << GRID_BITS)).round()
    return (scaled / (1 << GRID_BITS)).to(torch.float32)


def family(shape: Sequence[int], n_experts: int, seed: int, *, spread: float = 0.5, shared: float = 0.0,
           base_scale: float = 2.0, zero_frac: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, experts) in fp32 whose task vectors experts[t] - base are exact in fp32.

    tau_t = shared * z + spread * z_t (z, z_t standard normal, so ``shared`` correlates the experts), with a
    ``zero_frac`` fraction of each tau_t set to exactly 0.
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    base = on_grid(torch.randn(shape, generator=g, dtype=F64) * base_scale)
    common = torch.randn(shape, generator=g, dtype=F64) * shared
    experts = []
    for _ in range(n_experts):
        tau = on_grid(common + torch.randn(shape, generator=g, dtype=F64) * spread).to(F64)
        if zero_frac:
            tau = torch.where(torch.rand(shape, generator=g, dtype=F64) < zero_frac, torch.zeros_like(tau), tau)
        experts.append((base.to(F64) + tau).to(torch.float32))
    return base, experts


def integer_family(shape: Sequence[int], n_experts: int, seed: int, *, low: int = -3, high: int = 3,
                   nonzero: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(base, experts) with integer-valued task vectors in [low, high]: many exactly equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    base = torch.randint(-50, 51, shape, generator=g).to(torch.float32)
    experts = []
    for _ in range(n_experts):
        tau = torch.randint(low, high + 1, shape, generator=g).to(torch.float32)
        if nonzero:
            tau = torch.where(tau == 0, torch.full_like(tau, float(high)), tau)
        experts.append(base + tau)
    return base, experts
