"""RegMean against a float64 oracle written from MergeLM's regmean_merging (torch.inverse of the summed
reduced Grams), the pseudo-inverse fallback, chunk invariance, errors, and an end-to-end merge of the tiny
family with generated Gram files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.errors import CheckpointError, ConfigError, MergeError

from .test_fisher import run_method

F64 = torch.float64


def regmean_oracle(weights: list[torch.Tensor], grams: list[torch.Tensor] | None, alpha: float,
                   pinv: bool = False) -> torch.Tensor:
    """MergeLM regmean_merging in float64: W*^T = inv(sum G~) sum G~ W^T, G~ = G with off-diagonals x alpha;
    the plain average when there are no Grams. ``pinv`` swaps the inverse for the pseudo-inverse."""
    if grams is None:
        return torch.stack([w.to(F64) for w in weights]).mean(0)
    red = []
    for g in grams:
        g = g.to(F64)
        red.append(g * (torch.diag(torch.ones(g.shape[0], dtype=F64) - alpha) + alpha))
    s = sum(red)
    inv = torch.linalg.pinv(s, hermitian=True) if pinv else torch.inverse(s)
    return (inv @ sum(r @ w.to(F64).T for r, w in zip(red, weights))).T


def _gram(d: int, n: int, g: torch.Generator, dead: list[int] = ()) -> torch.Tensor:
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.rand(d, generator=g, dtype=F64).add(0.2)
    x[:, list(dead)] = 0
    return (x.T @ x / n).to(torch.float32)


SHAPES = {"a.weight": (13, 7), "b.weight": (5, 11), "c.weight": (131, 9), "v.bias": (11,)}


def _data(n_models: int, seed: int, dead: list[int] = ()):
    g = torch.Generator().manual_seed(seed)
    models = [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n_models)]
    grams = [{k: _gram(s[1], 4 * s[1] + 3, g, dead if k == "a.weight" else ()) for k, s in SHAPES.items()
              if len(s) == 2} for _ in range(n_models)]
    return models, grams


def _run(models, grams, alpha=1.0, max_rows=None, leave_out=()):
    inputs = {k: [m[k] for m in models] for k in SHAPES}
    aux = {"gram": {k: [None if (k in leave_out or k not in g) else g[k] for g in grams] for k in SHAPES}}
    return run_method("regmean", inputs, aux, params={"reduce_non_diagonal_ratio": alpha}, max_rows=max_rows)


def _assert_close(ours, ref, rel=1e-6):
    err = (ours.to(F64) - ref).abs()
    bound = rel * float(ref.abs().max()) + 1e-30
    assert bool((err <= bound).all()), f"max error {float(err.max())}, bound {bound}"


@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.6, 0.1, 0.0])
@pytest.mark.parametrize("n_models", [2, 3])
def test_matches_float64_oracle(alpha, n_models):
    models, grams = _data(n_models, seed=n_models * 10 + int(alpha * 100))
    ours = _run(models, grams, alpha)
    for k, s in SHAPES.items():
        ws = [m[k] for m in models]
        ref = regmean_oracle(ws, [g[k] for g in grams] if len(s) == 2 else None, alpha)
        _assert_close(ours[k], ref)
        if len(s) == 2 and alpha > 0:  # RegMean is not the average: the test would see a wrong formula
            assert not torch.allclose(ours[k].to(F64), regmean_oracle(ws, None, alpha), atol=1e-3)


def test_tensors_without_grams_are_averaged():
    models, grams = _data(3, seed=2)
    ours = _run(models, grams, 0.5, leave_out=("b.weight",))
    _assert_close(ours["b.weight"], regmean_oracle([m["b.weight"] for m in models], None, 0.5))
    _assert_close(ours["a.weight"], regmean_oracle([m["a.weight"] for m in models],
                                                   [g["a.weight"] for g in grams], 0.5))


def test_alpha_zero_is_a_diagonal_weighted_average():
    """alpha = 0 keeps diag(G) only: each input column j is averaged with weights G_t[j, j]."""
    models, grams = _data(3, seed=4)
    ours = _run(models, grams, 0.0)["a.weight"].to(F64)
    d = torch.stack([g["a.weight"].diagonal().to(F64) for g in grams])  # [models, d_in]
    w = torch.stack([m["a.weight"].to(F64) for m in models])  # [models, out, in]
    expect = (w * d[:, None, :]).sum(0) / d.sum(0)
    _assert_close(ours, expect)


def test_singular_sum_falls_back_to_pseudo_inverse(caplog):
    models, grams = _data(2, seed=8, dead=[1, 4])  # input features 1 and 4 are never seen by any model
    with caplog.at_level("WARNING", logger="pymerge"):
        ours = _run(models, grams, 1.0)["a.weight"]
    assert "pseudo-inverse" in caplog.text and "a.weight" in caplog.text
    assert torch.isfinite(ours).all()
    ref = regmean_oracle([m["a.weight"] for m in models], [g["a.weight"] for g in grams], 1.0, pinv=True)
    _assert_close(ours, ref)
    assert float(ours[:, [1, 4]].abs().max()) < 1e-12  # directions no model saw get no weight


@pytest.mark.parametrize("max_rows", [1, 2, 7, 64, 65])
def test_bit_identical_for_any_chunking(max_rows):
    models, grams = _data(3, seed=12)
    whole = _run(models, grams, 0.7)
    chunked = _run(models, grams, 0.7, max_rows=max_rows)
    for k in SHAPES:
        assert torch.equal(whole[k], chunked[k]), k


def test_errors():
    models, grams = _data(3, seed=1)
    grams[1].pop("a.weight")
    with pytest.raises(MergeError, match=r"a\.weight.*not for 'm1'"):
        _run(models, grams)
    models, grams = _data(2, seed=1)
    with pytest.raises(ConfigError, match="reduce_non_diagonal_ratio"):
        _run(models, grams, alpha=1.5)
    grams[0]["a.weight"] = torch.eye(5)
    with pytest.raises(MergeError, match=r"shape \[5, 5\], expected \[7, 7\]"):
        _run(models, grams)


# ------------------------------------------------------------------------------------------- end to end

GRAM_NAMES = ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
              "model.layers.{i}.mlp.down_proj.weight"]


def _gram_files(family, root: Path, seed: int) -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    paths = []
    for e, d in enumerate(family.experts):
        weights = load_file(str(d / "model.safetensors"))
        grams = {}
        for i in range(3):
            for pat in GRAM_NAMES:
                name = pat.format(i=i)
                grams[name] = _gram(weights[name].shape[1], 2 * weights[name].shape[1], g)
        p = root / f"gram{e}.safetensors"
        save_file(grams, str(p))
        paths.append(p)
    return paths


def _config(root: Path, family, paths, alpha=0.9) -> Path:
    cfg = {"merge_method": "regmean", "dtype": "float32", "parameters": {"reduce_non_diagonal_ratio": alpha},
           "models": [{"model": str(d), "parameters": {"gram": str(p)}} for d, p in zip(family.experts, paths)]}
    path = root / "regmean.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_end_to_end_tiny_family(tiny_family, tmp_path):
    paths = _gram_files(tiny_family, tmp_path, seed=3)
    out = tmp_path / "out"
    pymerge.merge(_config(tmp_path, tiny_family, paths), out, quiet=True, max_memory=30_000)  # several chunks
    merged = load_file(str(out / "model.safetensors"))
    models = [load_file(str(d / "model.safetensors")) for d in tiny_family.experts]
    grams = [load_file(str(p)) for p in paths]
    for name, w in merged.items():
        gs = [g[name] for g in grams] if name in grams[0] else None
        _assert_close(w, regmean_oracle([m[name] for m in models], gs, 0.9))


def test_end_to_end_wrong_gram_shape(tiny_family, tmp_path):
    paths = _gram_files(tiny_family, tmp_path, seed=3)
    bad = load_file(str(paths[2]))
    bad["model.layers.0.mlp.down_proj.weight"] = torch.eye(40)
    save_file(bad, str(paths[2]))
    with pytest.raises(CheckpointError) as e:
        pymerge.merge(_config(tmp_path, tiny_family, paths), tmp_path / "o", quiet=True)
    msg = str(e.value)
    assert "gram2.safetensors" in msg and "model.layers.0.mlp.down_proj.weight" in msg
    assert "[40, 40]" in msg and "[104, 104]" in msg
