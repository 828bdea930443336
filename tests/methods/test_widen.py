"""WIDEN against a float64 oracle written from yule-BUAA/MergeLLM (``merging_methods.py::widen_merging``: column
magnitudes and directions, stable-argsort ranks, softmax over models, above-average calibration, embedding
transposed, 1-D tensors scored on |theta_t - theta_0|), every element checked.

Tolerance: |ours - oracle| <= 1e-6 * (1 + |oracle|). The ranks must agree exactly (random continuous data has no
near-ties); the weights are fp32 in ours, float64 in the oracle.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import pymerge
from pymerge.ops import merge_tensors
from pymerge.ops.column_sums import ColumnSums


def _ranks(diff: torch.Tensor) -> torch.Tensor:
    """rank_per_param_magnitude_or_direction_within_model, as the integer position k (rank = k / n)."""
    order = torch.argsort(diff, dim=1, descending=False, stable=True)
    k = torch.zeros_like(diff)
    return torch.scatter(k, 1, order, torch.arange(diff.shape[1], dtype=diff.dtype).repeat(diff.shape[0], 1))


def _rank_scores(diff, ratio, calibration):
    k = _ranks(diff)
    n = diff.shape[1]
    scores = torch.softmax(k / n, dim=0)
    # the above-average test on ranks k/n > mean(k/n) * ratio, evaluated exactly: 2k > (n - 1) * ratio
    scores[2 * k > (n - 1) * ratio] = calibration
    return scores


def widen_oracle(name: str, base: torch.Tensor, experts: list[torch.Tensor], ratio=1.0, calibration=1.0):
    taus = torch.stack([(e.float() - base.float()).double() for e in experts])
    base, experts = base.double(), [e.double() for e in experts]
    if base.dim() < 2:
        diff = taus.abs()
        scores = torch.softmax(diff, dim=0)
        scores[diff > diff.mean(dim=1, keepdim=True) * ratio] = calibration
        return base + (taus * scores).sum(dim=0)
    embedding = name.endswith("embed_tokens.weight")
    shape = base.shape
    w0 = base.reshape(shape[0], -1)
    wts = [e.reshape(shape[0], -1) for e in experts]
    taus = taus.reshape(len(experts), shape[0], -1)
    if embedding:
        w0, wts, taus = w0.T, [w.T for w in wts], taus.transpose(1, 2)
    m0 = torch.norm(w0, p=2, dim=0)
    mags = torch.stack([(torch.norm(w, p=2, dim=0) - m0).abs() for w in wts])
    dirs = torch.stack([1.0 - torch.cosine_similarity(w / torch.norm(w, dim=0), w0 / m0, dim=0) for w in wts])
    weights = 0.5 * (_rank_scores(mags, ratio, calibration) + _rank_scores(dirs, ratio, calibration))
    merged = w0 + (taus * weights.unsqueeze(1)).sum(dim=0)
    return (merged.T if embedding else merged).reshape(shape)


def _family(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * (0.05 + 0.05 * i) for i in range(n)]


def _assert_close(ours, expected, tol=1e-6):
    err = (ours.double() - expected).abs()
    assert bool((err <= tol * (1 + expected.abs())).all()), f"max error {float(err.max()):.3g}"


@pytest.mark.parametrize("shape", [(1,), (9,), (23, 11), (8, 31), (4, 3, 5)], ids=str)
@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"])
def test_widen_matches_reference(shape, name):
    base, experts = _family(shape, 3, seed=shape[0] * 7 + len(name))
    for ratio, calibration in [(1.0, 1.0), (1.3, 0.5), (0.6, 2.0)]:
        ours = merge_tensors("widen", [base, *experts], base_index=0, name=name,
                             params={"above_average_value_ratio": ratio, "score_calibration_value": calibration})
        _assert_close(ours, widen_oracle(name, base, experts, ratio, calibration))


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"])
def test_widen_chunked_equals_resident(name):
    base, experts = _family((150, 9), 3, seed=4)  # > 2 fixed row blocks of the column sums
    whole = merge_tensors("widen", [base, *experts], base_index=0, name=name)
    for rows in (1, 7, 64, 100):
        assert torch.equal(whole, merge_tensors("widen", [base, *experts], base_index=0, name=name,
                                                max_rows_per_chunk=rows)), rows


def test_column_sums_do_not_depend_on_chunking():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 37, generator=g, dtype=torch.float64) * torch.logspace(-8, 8, 37, dtype=torch.float64)
    ref = ColumnSums(37)
    ref.add(0, x)
    for step in (1, 3, 64, 65, 999):
        cs = ColumnSums(37)
        for a in range(0, 1000, step):
            cs.add(a, x[a:a + step])
        assert torch.equal(cs.total(), ref.total()), step
    torch.testing.assert_close(ref.total(), x.sum(dim=0), rtol=1e-12, atol=0)


def test_end_to_end(tiny_family, tmp_path):
    cfg = {"merge_method": "widen", "base_model": str(tiny_family.base), "dtype": "float32",
           "models": [{"model": str(p)} for p in tiny_family.experts]}
    pymerge.merge(cfg, tmp_path / "whole", quiet=True)
    small = pymerge.merge(cfg, tmp_path / "small", quiet=True, max_memory=16 * 1024)
    assert small.chunked_tensors >= 2
    out = load_file(str(tmp_path / "whole" / "model.safetensors"))
    out_small = load_file(str(tmp_path / "small" / "model.safetensors"))
    base = load_file(str(tiny_family.base / "model.safetensors"))
    experts = [load_file(str(p / "model.safetensors")) for p in tiny_family.experts]
    for k in base:
        _assert_close(out[k], widen_oracle(k, base[k], [e[k] for e in experts]))
        assert torch.equal(out[k], out_small[k]), k
