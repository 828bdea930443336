"""PCB-Merging against a float64 oracle written from duguodong7/pcb-merging (``pcb-merging.py::PCB_merge`` and the
vision ``pcb.py`` / ``pcb_ES.py`` inter-balancing variants), on random odd-shaped tensors, every element checked.

Tolerance: our math is fp32 (as the reference's), the oracle fp64: |ours - oracle| <= 2e-5 * (1 + |oracle|).
The map is continuous in beta and in every quantile, so fp32 rounding moves outputs by rounding-sized amounts
only; random continuous data keeps every element far (~1/D of the range) from the drop threshold.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import pymerge
from pymerge.errors import ConfigError
from pymerge.ops import merge_tensors


def _clamp_sorted(x: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
    """The reference's clamp(x, min_ratio, max_ratio) on a [n, d] tensor: clip each row to two sorted positions."""
    d = x.shape[1]
    s, _ = torch.sort(x, dim=1)
    lo = s[:, int(d * min_ratio)].unsqueeze(1)
    hi = s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1)
    return torch.maximum(torch.minimum(x, hi), lo)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    lo = x.min(dim=1, keepdim=True).values
    hi = x.max(dim=1, keepdim=True).values
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


def pcb_oracle(tau: torch.Tensor, *, ratio: float, clip: float, inter: str, weights=None) -> torch.Tensor:
    """Merged task vector of flat task vectors ``tau[n, d]`` (float64), the reference's steps one by one."""
    tau = tau.double()
    n, _ = tau.shape
    a = _clamp_sorted(tau.abs(), clip, clip)
    clipped = torch.sign(tau) * a
    intra = torch.exp(n * _normalize(a) ** 2)
    s = torch.sign(tau) * _normalize(a)
    if inter == "sum":
        cross = torch.tanh(tau * tau.sum(dim=0))
    elif inter == "normalized":
        cross = torch.tanh(tau * s.sum(dim=0))
    else:
        cross = torch.stack([torch.tanh(s[i] * s).sum(dim=0) for i in range(n)])
    scale = _normalize(_clamp_sorted(intra * cross, 1 - ratio, 0))
    w = torch.ones(n, 1, dtype=torch.float64) if weights is None else torch.tensor(weights).double().unsqueeze(1)
    return (clipped * w * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


def _family(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # task vectors of different spreads, so intra/inter balancing and the clip all matter
    experts = [base + torch.randn(shape, generator=g) * (0.5 + 0.4 * i) for i in range(n)]
    return base, experts


def _assert_close(ours: torch.Tensor, expected: torch.Tensor, tol: float = 2e-5):
    err = (ours.double() - expected).abs()
    bound = tol * (1 + expected.abs())
    assert bool((err <= bound).all()), f"max error {float(err.max()):.3g} (bound {tol} relative)"


@pytest.mark.parametrize("shape", [(1,), (7,), (31, 17), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("inter", ["sum", "normalized", "pairwise"])
def test_pcb_tensor_matches_reference(shape, inter):
    base, experts = _family(shape, 4, seed=11 + len(shape) + shape[0])
    for ratio, clip, lam, weights in [(0.1, 0.0001, 1.0, None), (0.3, 0.01, 0.8, [1.2, 0.9, 1.0, 1.3]),
                                      (1.0, 0.0, 1.5, None)]:
        mp = [{}] + [{"weight": w} for w in (weights or [1.0] * 4)]
        params = {"pcb_ratio": ratio, "clip_ratio": clip, "pcb_inter": inter, "lambda": lam}
        tau = torch.stack([e - base for e in experts]).reshape(4, -1)
        expected = base.double() + lam * pcb_oracle(tau, ratio=ratio, clip=clip, inter=inter,
                                                    weights=weights).reshape(shape)
        for scope in ("tensor", "global"):  # a single tensor is the whole model
            ours = merge_tensors("pcb", [base, *experts], base_index=0, model_params=mp,
                                 params={**params, "pcb_scope": scope})
            _assert_close(ours, expected)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("inter", ["sum", "pairwise"])
def test_pcb_chunked_equals_resident(scope, inter):
    base, experts = _family((19, 17), 3, seed=5)
    # integer-valued task vectors: many equal magnitudes, so the selections meet ties across chunks
    experts[1] = base + torch.randint(-2, 3, base.shape).float()
    params = {"pcb_scope": scope, "pcb_inter": inter, "pcb_ratio": 0.3, "clip_ratio": 0.05}
    whole = merge_tensors("pcb", [base, *experts], base_index=0, params=params)
    for rows in (1, 2, 7):
        chunked = merge_tensors("pcb", [base, *experts], base_index=0, params=params, max_rows_per_chunk=rows)
        assert torch.equal(whole, chunked), rows


def test_single_task_keeps_exactly_the_elements_above_the_quantile():
    """One task: beta = exp(.) tanh(tau^2) grows with |tau|, so PCB keeps the top D - int(D(1-r)) - 1 by |tau|
    (the quantile element itself gets scale 0), unchanged apart from the clip, and zeroes the rest."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 11, generator=g)
    tau = torch.randn(37, 11, generator=g)
    d, r = tau.numel(), 0.2
    ours = merge_tensors("pcb", [base, base + tau], base_index=0, params={"pcb_ratio": r, "clip_ratio": 0.0})
    keep = d - int(d * (1 - r)) - 1
    order = torch.argsort(tau.abs().reshape(-1), descending=True)
    kept = torch.zeros(d, dtype=torch.bool)
    kept[order[:keep]] = True
    delta = (ours - base).reshape(-1)
    assert torch.equal(delta != 0, kept)  # exactly the top `keep` by |tau|; the rest is the base, bit for bit
    torch.testing.assert_close(delta[kept], tau.reshape(-1)[kept], rtol=1e-6, atol=1e-6)
    assert int(((ours - base) != 0).sum()) == keep


def test_bad_parameters_are_config_errors():
    base, experts = _family((5, 3), 2, seed=1)
    for params, match in [({"pcb_ratio": 0.0}, "pcb_ratio"), ({"clip_ratio": 0.5}, "clip_ratio"),
                          ({"pcb_inter": "max"}, "pcb_inter"), ({"pcb_scope": "layer"}, "pcb_scope")]:
        with pytest.raises(ConfigError, match=match):
            merge_tensors("pcb", [base, *experts], base_index=0, params=params)


def _run(family, tmp_path, name, params, **kw):
    cfg = {"merge_method": "pcb", "base_model": str(family.base), "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family.experts, (1.0, 1.1, 0.9))],
           "parameters": params}
    report = pymerge.merge(cfg, tmp_path / name, quiet=True, **kw)
    return report, load_file(str(tmp_path / name / "model.safetensors"))


def test_end_to_end_global_scope_uses_whole_model_statistics(tiny_family, tmp_path):
    params = {"pcb_ratio": 0.2, "clip_ratio": 0.01, "lambda": 1.1}
    _, out = _run(tiny_family, tmp_path, "whole", params)
    base = load_file(str(tiny_family.base / "model.safetensors"))
    experts = [load_file(str(p / "model.safetensors")) for p in tiny_family.experts]
    names = sorted(base)
    tau = torch.stack([torch.cat([(e[k].double() - base[k].double()).reshape(-1) for k in names]) for e in experts])
    merged = pcb_oracle(tau, ratio=0.2, clip=0.01, inter="sum", weights=[1.0, 1.1, 0.9])
    at = 0
    for k in names:
        n = base[k].numel()
        expected = base[k].double() + 1.1 * merged[at:at + n].reshape(base[k].shape)
        at += n
        _assert_close(out[k], expected)
    # the whole-model statistics differ from per-tensor ones: the global run is not the per-tensor run
    _, per_tensor = _run(tiny_family, tmp_path, "tensor", {**params, "pcb_scope": "tensor"})
    assert any(not torch.equal(out[k], per_tensor[k]) for k in names)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_end_to_end_bytes_do_not_depend_on_the_memory_budget(tiny_family, tmp_path, scope):
    params = {"pcb_ratio": 0.1, "pcb_scope": scope, "pcb_inter": "normalized"}
    whole, a = _run(tiny_family, tmp_path, "whole", params)
    small, b = _run(tiny_family, tmp_path, "small", params, max_memory=16 * 1024)
    assert whole.chunked_tensors == 0 and small.chunked_tensors >= 2
    assert all(torch.equal(a[k], b[k]) for k in a)
