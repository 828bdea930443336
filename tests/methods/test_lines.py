"""LiNeS against a float64 oracle written from wang-kee/LiNeS (``src/eval/eval.py::LiNeS_scaling``, the multi-task
alpha of ``evaluate`` and the L1 norms of ``aggregation.py``), every element checked.

Tolerance: |ours - oracle| <= 1e-6 * (1 + |oracle|) (fp32 sum and scale vs float64, one rounding each).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import pymerge
from pymerge.errors import ConfigError
from pymerge.methods.lines import layer_index
from pymerge.ops import merge_tensors


def lines_oracle(base: dict, experts: list[dict], weights, *, beta: float, alpha=None, num_blocks=None) -> dict:
    names = sorted(base)
    taus = {k: [(e[k].float() - base[k].float()).double() for e in experts] for k in names}
    merged = {k: sum(w * t for w, t in zip(weights, taus[k])) for k in names}
    if alpha is None:
        summed = sum(float(sum(taus[k]).abs().sum()) for k in names)
        norm_mtv = sum(float(merged[k].abs().sum()) for k in names)
        alpha = summed / norm_mtv / len(experts)
    blocks = [f".{i}." for i in range(num_blocks)]
    out = {}
    for k in names:
        scale = alpha  # outside the residual blocks
        for layer, block in enumerate(blocks):  # the reference's substring rule
            if block in k:
                scale = alpha + beta * (layer / (num_blocks - 1))
                break
        out[k] = base[k].double() + scale * merged[k]
    return out


def _assert_close(ours, expected, tol=1e-6):
    err = (ours.double() - expected).abs()
    assert bool((err <= tol * (1 + expected.abs())).all()), f"max error {float(err.max()):.3g}"


def test_layer_index_parsing():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("visual.transformer.resblocks.7.mlp.c_fc.0.weight") == 7  # not the ".0." of c_fc.0
    assert layer_index("encoder.layer.11.output.dense.weight") == 11
    assert layer_index("decoder.block.2.layer.0.SelfAttention.q.weight") == 2  # the first layer component
    assert layer_index("model.embed_tokens.weight") is None and layer_index("lm_head.weight") is None
    assert layer_index("model.layers_extra.4.weight") is None


@pytest.mark.parametrize("shape", [(7,), (13, 5), (3, 4, 5)], ids=str)
def test_single_tensor_matches_reference(shape):
    g = torch.Generator().manual_seed(shape[0])
    base = torch.randn(shape, generator=g)
    experts = [base + torch.randn(shape, generator=g) * 0.1 for _ in range(3)]
    weights = [1.0, 0.6, -0.4]
    mp = [{}] + [{"weight": w} for w in weights]
    for name, layers, alpha, beta in [("model.layers.2.mlp.up_proj.weight", 5, None, 0.7),
                                      ("model.layers.4.mlp.up_proj.weight", 5, 0.3, 1.2),
                                      ("model.norm.weight", 5, None, 0.7), ("h.0.attn.weight", 1, 0.5, 2.0)]:
        ours = merge_tensors("lines", [base, *experts], base_index=0, model_params=mp, name=name,
                             params={"alpha": alpha, "beta": beta, "num_layers": layers})
        if layers == 1:  # the reference divides by zero there; ours: depth fraction 0
            expected = base.double() + alpha * sum(w * (e.double() - base.double()) for w, e in zip(weights, experts))
        else:
            expected = lines_oracle({name: base}, [{name: e} for e in experts], weights, beta=beta, alpha=alpha,
                                    num_blocks=layers)[name]
        _assert_close(ours, expected)


def test_chunked_equals_resident():
    g = torch.Generator().manual_seed(9)
    base = torch.randn(19, 17, generator=g)
    experts = [base + torch.randn(19, 17, generator=g) for _ in range(3)]
    kw = dict(base_index=0, name="model.layers.1.x.weight", params={"beta": 0.4, "num_layers": 3},
              model_params=[{}, {"weight": 0.5}, {"weight": 1.5}, {"weight": 1.0}])
    whole = merge_tensors("lines", [base, *experts], **kw)
    for rows in (1, 2, 7):
        assert torch.equal(whole, merge_tensors("lines", [base, *experts], max_rows_per_chunk=rows, **kw))


def test_errors():
    base = torch.zeros(4, 3)
    with pytest.raises(ConfigError, match="beta"):
        merge_tensors("lines", [base, base + 1], base_index=0)
    with pytest.raises(ConfigError, match="num_layers is 3"):
        merge_tensors("lines", [base, base + 1], base_index=0, name="model.layers.5.w",
                      params={"beta": 1.0, "num_layers": 3})


def _merge(family, tmp_path, name, params, weights=(1.0, 0.6, 1.4), **kw):
    cfg = {"merge_method": "lines", "base_model": str(family.base), "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(family.experts, weights)],
           "parameters": params}
    report = pymerge.merge(cfg, tmp_path / name, quiet=True, **kw)
    return report, load_file(str(tmp_path / name / "model.safetensors"))


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_end_to_end_matches_reference(tiny_family, tmp_path, alpha):
    params = {"beta": 0.8} if alpha is None else {"beta": 0.8, "alpha": alpha}
    whole, out = _merge(tiny_family, tmp_path, "whole", params)
    small, out_small = _merge(tiny_family, tmp_path, "small", params, max_memory=16 * 1024)
    assert small.chunked_tensors >= 2
    base = load_file(str(tiny_family.base / "model.safetensors"))
    experts = [load_file(str(p / "model.safetensors")) for p in tiny_family.experts]
    expected = lines_oracle(base, experts, [1.0, 0.6, 1.4], beta=0.8, alpha=alpha, num_blocks=3)
    for k in base:
        _assert_close(out[k], expected[k])
        assert torch.equal(out[k], out_small[k])
    # a given alpha needs no whole-model pass (the layer count comes from the tensor names): every input byte is
    # read once; the automatic alpha reads them twice (its L1-norm pass, then the merge)
    input_bytes = sum(p.stat().st_size for d in (tiny_family.base, *tiny_family.experts)
                      for p in d.glob("*.safetensors"))
    reads = whole.bytes_read / input_bytes
    assert (0.95 < reads < 1.0) if alpha is not None else (1.9 < reads < 2.0)  # files also hold headers
