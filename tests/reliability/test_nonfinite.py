"""NaN/Inf in inputs: an error naming tensor, model and count before anything is committed, unless allowed."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import pymerge
from pymerge.cli import main
from pymerge.errors import MergeError

from ._family import MATRIX, VECTOR, leftovers, linear_config, make_family, poke, ties_config

INF, NAN = math.inf, math.nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget", [None, 24 * 1024], ids=["resident", "chunked"])
def test_inf_in_base_and_nan_in_expert_are_named_with_counts(tmp_path, dtype, budget):
    paths = make_family(tmp_path / "f", dtype=dtype)
    # Last rows: in the chunked run they are only seen by the last chunk of the first pass.
    poke(paths[0], MATRIX, {(60, 96): INF, (59, 0): -INF, (60, 3): INF})
    poke(paths[2], MATRIX, {(60, 95): NAN, (0, 0): NAN})
    with pytest.raises(MergeError) as ei:
        pymerge.merge(ties_config(paths), tmp_path / "out", quiet=True, max_memory=budget)
    msg = str(ei.value)
    assert f"tensor '{MATRIX}'" in msg
    assert f"model '{paths[0]}'" in msg and "3 Inf of 5917" in msg
    assert f"model '{paths[2]}'" in msg and "2 NaN of 5917" in msg
    assert f"model '{paths[1]}'" not in msg  # the clean expert is not blamed
    assert "allow_nonfinite" in msg
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_nan_and_inf_in_one_expert_counted_separately(tmp_path):
    paths = make_family(tmp_path / "f")
    poke(paths[1], VECTOR, {(0,): NAN, (1,): INF, (2,): -INF, (60,): NAN})
    with pytest.raises(MergeError, match=r"model '.*m1' \(input tensor 'model.norm.weight': 2 NaN and 2 Inf of 61\)"):
        pymerge.merge(linear_config(paths), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_global_trim_checks_in_its_first_pass(tmp_path):
    paths = make_family(tmp_path / "f")
    poke(paths[1], MATRIX, {(7, 7): INF})
    with pytest.raises(MergeError, match=r"tensor 'model.layers.0.mlp.up_proj.weight'.*1 Inf"):
        pymerge.merge(ties_config(paths, trim_scope="global"), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def _native_built() -> bool:
    from pymerge._native import native_module

    return native_module() is not None


# The native kernels read the memory maps in place (only output rows count against the budget), so they need
# a far smaller budget than the torch backend's fp32 stacks to stream in chunks.
@pytest.mark.parametrize("backend,budget", [
    ("torch", None), ("torch", 24 * 1024),
    pytest.param("cpu", None, marks=pytest.mark.skipif(not _native_built(), reason="pymerge._C is not built")),
    pytest.param("cpu", 2048, marks=pytest.mark.skipif(not _native_built(), reason="pymerge._C is not built")),
], ids=["torch-resident", "torch-chunked", "cpu-resident", "cpu-chunked"])
def test_allowed_nonfinite_values_propagate_and_the_rest_is_unchanged(tmp_path, backend, budget):
    paths = make_family(tmp_path / "f")
    clean = pymerge.merge(linear_config(paths), tmp_path / "clean", quiet=True, max_memory=budget, backend=backend)
    poke(paths[1], MATRIX, {(3, 4): INF, (60, 96): NAN})
    poke(paths[2], VECTOR, {(10,): -INF})
    pymerge.merge(linear_config(paths), tmp_path / "dirty", quiet=True, max_memory=budget, allow_nonfinite=True,
                  backend=backend)
    assert clean.tensors == 3 and (clean.chunked_tensors > 0) == (budget is not None)
    a = load_file(str(tmp_path / "clean" / "model.safetensors"))
    b = load_file(str(tmp_path / "dirty" / "model.safetensors"))
    assert b[MATRIX][3, 4] == INF and b[MATRIX][60, 96].isnan() and b[VECTOR][10] == -INF
    for name, poked in ((MATRIX, [(3, 4), (60, 96)]), (VECTOR, [(10,)])):
        keep = torch.ones_like(a[name], dtype=torch.bool)
        for idx in poked:
            keep[idx] = False
        assert torch.equal(a[name][keep], b[name][keep]), name
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_cli_flag_and_one_line_error(tmp_path):
    import yaml

    paths = make_family(tmp_path / "f")
    poke(paths[0], VECTOR, {(5,): NAN})
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(linear_config(paths)))
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tensor 'model.norm.weight'") and "1 NaN" in lines[0]
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q", "--allow-nonfinite"])
    assert res.exit_code == 0, res.output
    assert load_file(str(tmp_path / "out" / "model.safetensors"))[VECTOR][5].isnan()


def test_finite_values_whose_sum_overflows_are_not_an_error(tmp_path):
    # The fast check sums the chunk; a sum overflowing fp32 must fall back to the exact check, not fail.
    paths = make_family(tmp_path / "f", n_experts=1)
    big = {(i,): 3e38 for i in range(4)}
    poke(paths[0], VECTOR, big)
    poke(paths[1], VECTOR, big)
    cfg = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in paths]}
    pymerge.merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))[VECTOR]
    assert torch.all(out[:4] == torch.tensor(3e38, dtype=torch.float32))


@pytest.mark.skipif(not _native_built(), reason="pymerge._C is not built")
def test_native_ties_finds_nonfinite_in_its_histogram_pass(tmp_path, monkeypatch):
    """The native ties merge reports NaN/Inf from its first histogram pass (no separate scan): the scan is made
    to fail, and the error still names every bad input with its counts; a task vector that only overflows
    (finite inputs 6e38 apart) is not an error."""
    import pymerge.ops.native_cpu as nc

    def no_scan(xs):
        raise AssertionError("the separate NaN/Inf scan ran")

    monkeypatch.setattr(nc, "count_nonfinite", no_scan)
    paths = make_family(tmp_path / "f")
    poke(paths[0], MATRIX, {(5, 5): INF})
    poke(paths[2], MATRIX, {(7, 1): NAN})
    with pytest.raises(MergeError) as ei:
        pymerge.merge(ties_config(paths), tmp_path / "out", quiet=True, backend="cpu")
    msg = str(ei.value)
    assert f"model '{paths[0]}'" in msg and "1 Inf of 5917" in msg
    assert f"model '{paths[2]}'" in msg and "1 NaN of 5917" in msg and f"model '{paths[1]}'" not in msg

    clean = make_family(tmp_path / "g")
    poke(clean[0], MATRIX, {(3, 3): -3e38})
    poke(clean[1], MATRIX, {(3, 3): 3e38})  # tau = 6e38 overflows fp32 to Inf: finite inputs, no error
    monkeypatch.undo()
    rep = pymerge.merge(ties_config(clean), tmp_path / "ok", quiet=True, backend="cpu")
    assert rep.backend == "cpu"
    pymerge.merge(ties_config(clean), tmp_path / "ok-torch", quiet=True, backend="torch")
    assert (tmp_path / "ok" / "model.safetensors").read_bytes() == \
        (tmp_path / "ok-torch" / "model.safetensors").read_bytes()  # the same (overflowing) math as torch


@pytest.mark.parametrize("backend,budget", [
    ("torch", None),
    pytest.param("cpu", None, marks=pytest.mark.skipif(not _native_built(), reason="pymerge._C is not built")),
    pytest.param("cpu", 2048, marks=pytest.mark.skipif(not _native_built(), reason="pymerge._C is not built")),
], ids=["torch", "cpu-resident", "cpu-chunked"])
def test_linear_zero_weight_nan_is_caught_and_an_overflow_is_not_an_input_error(tmp_path, backend, budget):
    """The native linear merge checks its output instead of its inputs: a NaN input with weight 0 still poisons
    the output (NaN * 0 = NaN) and is named; finite inputs whose sum overflows to Inf are not an input error."""
    paths = make_family(tmp_path / "f")
    cfg = linear_config(paths)
    cfg["models"][1]["parameters"]["weight"] = 0.0
    poke(paths[1], MATRIX, {(60, 96): NAN})
    with pytest.raises(MergeError, match=rf"model '{paths[1]}' \(input tensor '{MATRIX}': 1 NaN of 5917\)"):
        pymerge.merge(cfg, tmp_path / "out", quiet=True, max_memory=budget, backend=backend)
    assert not (tmp_path / "out").exists()
    poke(paths[1], MATRIX, {(60, 96): 0.5})
    big = 3.0e38  # finite in fp32; 3e38 * 1 + 3e38 * 3 overflows
    poke(paths[0], MATRIX, {(5, 5): big})
    poke(paths[2], MATRIX, {(5, 5): big})
    pymerge.merge(cfg | {"parameters": {"normalize": False}}, tmp_path / "out2", quiet=True, max_memory=budget,
                  backend=backend)
    assert load_file(str(tmp_path / "out2" / "model.safetensors"))[MATRIX][5, 5] == INF


@pytest.mark.parametrize("method", ["dare_ties", "della"])
@pytest.mark.parametrize("backend,budget", [
    ("torch", None),
    pytest.param("cpu", None, marks=pytest.mark.skipif(not _native_built(), reason="pymerge._C is not built")),
    pytest.param("cpu", 2048, marks=pytest.mark.skipif(not _native_built(), reason="pymerge._C is not built")),
], ids=["torch", "cpu-resident", "cpu-chunked"])
def test_rescaled_dare_finds_nonfinite_inputs_in_its_l1_pass(tmp_path, method, backend, budget, monkeypatch):
    """With rescale on, the native DARE/DELLA merges learn of NaN/Inf inputs from their L1 row sums (no separate
    scan): the error still names every bad input with its counts, whichever expert or the base holds them."""
    if backend == "cpu":
        from pymerge.ops import native_cpu

        def no_scan(xs):
            raise AssertionError("the executor scanned the inputs: the L1 pass should have found them")
        monkeypatch.setattr(native_cpu, "count_nonfinite", no_scan)
    paths = make_family(tmp_path / "f", n_experts=3)
    poke(paths[0], MATRIX, {(60, 96): INF})
    poke(paths[3], MATRIX, {(0, 0): NAN, (30, 1): NAN})
    cfg = {"merge_method": method, "base_model": str(paths[0]), "dtype": "float32",
           "parameters": {"rescale": True},
           "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}
                      for p in paths[1:]]}
    if method == "dare_ties":
        for m in cfg["models"]:
            del m["parameters"]["epsilon"]
    with pytest.raises(MergeError) as ei:
        pymerge.merge(cfg, tmp_path / "out", quiet=True, max_memory=budget, backend=backend, seed=3)
    msg = str(ei.value)
    assert f"tensor '{MATRIX}'" in msg
    assert f"model '{paths[0]}'" in msg and "1 Inf of 5917" in msg
    assert f"model '{paths[3]}'" in msg and "2 NaN of 5917" in msg
    assert f"model '{paths[1]}'" not in msg and f"model '{paths[2]}'" not in msg
    assert not (tmp_path / "out").exists()
