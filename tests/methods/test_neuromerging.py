"""NeuroMerging against a float64 oracle written from ZzzitaoFang/NeuroMerging (``merging_methods.py``:
``mask_smallest_magnitude_param_values``, ``ours_kernel_double``, ``inner_ties_kernel``, ``ties_kernel``), with
the per-row SVD taken by ``torch.linalg.svd`` as the reference does; every element checked.

Tolerance: |ours - oracle| <= 1e-5 * (1 + |oracle|): ours goes through the Gram eigendecomposition in float64 and
one cast to fp32, the oracle through float64 SVDs. Task vectors are fp32 differences in both (the trim compares
exactly the same magnitudes).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import pymerge
from pymerge.errors import ConfigError
from pymerge.ops import merge_tensors


def _ties(x: torch.Tensor) -> torch.Tensor:
    """inner_ties_kernel / resolve_sign + disjoint_merge over dim 0 of x[t, b] (majority over b)."""
    sign = torch.sign(x.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, x > 0, x < 0)
    x = x * keep
    return x.sum(dim=0) / torch.clamp((x != 0).sum(dim=0).double(), min=1)


def _trim(flat: torch.Tensor, rate: float) -> torch.Tensor:
    """mask_smallest_magnitude_param_values on flat[t, d] (keep |x| >= the int(d*rate)-th smallest)."""
    k = int(flat.shape[1] * rate)
    if k == 0:
        return flat
    kth = flat.abs().kthvalue(k=k, dim=1, keepdim=True).values
    return flat * (flat.abs() >= kth)


def _neuronal(w: torch.Tensor, taus: torch.Tensor, cum: float, unit: str):
    """(Par, Orth) of ours_kernel_double for w[m, n], taus[k, m, n] (float64)."""
    scale = (taus * w).sum(dim=2) / (w * w).sum(dim=1)
    perp = taus - scale.unsqueeze(2) * w
    abar = _ties(scale)
    par = abar.unsqueeze(1) * (w / w.norm(dim=1, keepdim=True) if unit == "reference" else w)
    perp = perp.permute(1, 0, 2)
    _, s, vt = torch.linalg.svd(perp, full_matrices=False)
    s2 = s ** 2
    cum_var = torch.cumsum(s2, dim=1) / s2.sum(dim=1, keepdim=True)
    rank = torch.minimum((cum_var < cum).sum(dim=1) + 1, torch.tensor(vt.shape[-2]))
    v = vt.permute(0, 2, 1)
    coords = torch.matmul(perp, v)
    rows = []
    for m in range(coords.shape[0]):
        c = _ties(coords[m])
        rows.append((c[:rank[m]] * v[m, :, :rank[m]]).sum(dim=1))
    return par, torch.stack(rows)


def neuro_oracle(base: dict, experts: list[dict], *, rate=0.8, lam1=0.0, lam2=1.0, cum=1.0, unit="consistent",
                 mode="full", scope="global") -> dict:
    names = sorted(base)
    taus = {k: torch.stack([(e[k].float() - base[k].float()).double() for e in experts]) for k in names}
    t = len(experts)
    if scope == "global":
        flat = _trim(torch.cat([taus[k].reshape(t, -1) for k in names], dim=1), rate)
        at = 0
        for k in names:
            n = base[k].numel()
            taus[k] = flat[:, at:at + n].reshape(taus[k].shape)
            at += n
    else:
        taus = {k: _trim(v.reshape(t, -1), rate).reshape(v.shape) for k, v in taus.items()}
    out = {}
    for k in names:
        w = base[k].double()
        if w.dim() >= 2:
            par, orth = _neuronal(w.reshape(w.shape[0], -1), taus[k].reshape(t, w.shape[0], -1), cum, unit)
            par, orth = par.reshape(w.shape), orth.reshape(w.shape)
            out[k] = w + lam2 * orth + (lam1 * par if mode == "full" else 0)
        else:
            merged = _ties(taus[k].reshape(t, -1)).reshape(w.shape)
            out[k] = w + (lam2 if mode == "lite" else (lam1 + lam2) / 2) * merged
    return out


def _assert_close(ours: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5):
    err = (ours.double() - expected).abs()
    assert bool((err <= tol * (1 + expected.abs())).all()), f"max error {float(err.max()):.3g}"


def _family(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * (0.05 + 0.03 * i) for i in range(n)]


SETTINGS = [
    dict(rate=0.8),
    dict(rate=0.5, lam1=0.7, lam2=1.3, unit="reference"),
    dict(rate=0.3, lam1=1.1, lam2=0.9, cum=0.7),
    dict(rate=0.0, lam2=2.0, mode="lite"),
]


@pytest.mark.parametrize("shape", [(1,), (9,), (5, 2), (23, 11), (4, 3, 5)], ids=str)
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_neuromerging_tensor_matches_reference(shape, setting):
    s = SETTINGS[setting]
    base, experts = _family(shape, 3, seed=7 + shape[0] + setting)
    params = {"param_value_mask_rate": s["rate"], "lambda1": s.get("lam1", 0.0), "lambda2": s.get("lam2", 1.0),
              "cum_threshold": s.get("cum", 1.0), "parallel_mode": s.get("unit", "consistent"),
              "neuro_mode": s.get("mode", "full")}
    for scope in ("global", "tensor"):
        ours = merge_tensors("neuromerging", [base, *experts], base_index=0, params={**params, "trim_scope": scope})
        expected = neuro_oracle({"x": base}, [{"x": e} for e in experts], scope=scope, **s)["x"]
        _assert_close(ours, expected)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_neuromerging_chunked_equals_resident(scope):
    base, experts = _family((19, 17), 4, seed=2)
    experts[2] = base + torch.randint(-2, 3, base.shape).float() * 0.05  # tied magnitudes across chunks
    params = {"trim_scope": scope, "param_value_mask_rate": 0.6, "lambda1": 0.8, "lambda2": 1.2}
    whole = merge_tensors("neuromerging", [base, *experts], base_index=0, params=params)
    for rows in (1, 2, 7):
        chunked = merge_tensors("neuromerging", [base, *experts], base_index=0, params=params, max_rows_per_chunk=rows)
        assert torch.equal(whole, chunked), rows


def test_zero_base_rows_and_single_expert():
    """||w|| = 0 rows take alpha = 0 (the reference divides by zero); one expert: Orth is its orthogonal part."""
    base, (e,) = _family((6, 5), 1, seed=4)
    base[2] = 0
    e[2] = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.05])
    ours = merge_tensors("neuromerging", [base, e], base_index=0,
                         params={"param_value_mask_rate": 0.0, "lambda1": 1.0, "lambda2": 1.0})
    # alpha w + (tau - alpha w) = tau exactly in real arithmetic: one expert and full weights give theta_1 back
    torch.testing.assert_close(ours, e, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(ours).all()


def test_bad_parameters_are_config_errors():
    base, experts = _family((5, 3), 2, seed=1)
    for params, match in [({"param_value_mask_rate": 1.5}, "param_value_mask_rate"),
                          ({"neuro_mode": "half"}, "neuro_mode"), ({"parallel_mode": "unit"}, "parallel_mode"),
                          ({"trim_scope": "row"}, "trim_scope")]:
        with pytest.raises(ConfigError, match=match):
            merge_tensors("neuromerging", [base, *experts], base_index=0, params=params)


def test_end_to_end_global_trim_matches_reference(tiny_family, tmp_path):
    params = {"param_value_mask_rate": 0.7, "lambda1": 0.5, "lambda2": 1.5}
    cfg = {"merge_method": "neuromerging", "base_model": str(tiny_family.base), "dtype": "float32",
           "models": [{"model": str(p)} for p in tiny_family.experts], "parameters": params}
    pymerge.merge(cfg, tmp_path / "whole", quiet=True)
    small = pymerge.merge(cfg, tmp_path / "small", quiet=True, max_memory=24 * 1024)
    assert small.chunked_tensors >= 2
    out = load_file(str(tmp_path / "whole" / "model.safetensors"))
    out_small = load_file(str(tmp_path / "small" / "model.safetensors"))
    base = load_file(str(tiny_family.base / "model.safetensors"))
    experts = [load_file(str(p / "model.safetensors")) for p in tiny_family.experts]
    expected = neuro_oracle(base, experts, rate=0.7, lam1=0.5, lam2=1.5)
    for k in base:
        _assert_close(out[k], expected[k])
        assert torch.equal(out[k], out_small[k]), k
