"""CLI: run/inspect/env/demo, one-line errors without tracebacks, no output left behind on failure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from pymerge.cli import main


def _write_config(tmp_path, family, **extra):
    cfg = {"merge_method": "ties", "base_model": str(family.base), "dtype": "float32",
           "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in family.experts]}
    cfg.update(extra)
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_writes_a_complete_output(tmp_path, tiny_family):
    cfg = _write_config(tmp_path, tiny_family)
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "pymerge_config.yml", "README.md"} <= names
    assert "tokenizer_config.json" in names  # copied from the base
    base = load_file(str(tiny_family.base / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert set(merged) == set(base)
    assert yaml.safe_load((out / "pymerge_config.yml").read_text())["merge_method"] == "ties"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.update(merge_method="tie"), "merge_method 'tie'"),
    (lambda c: c.update(modles=[]), "modles"),
    (lambda c: c["models"][0]["parameters"].update(densty=0.1), "densty"),
    (lambda c: c["models"][0]["parameters"].pop("weight"), "'weight' is required"),
    (lambda c: c.update(base_model="/nonexistent/model"), "/nonexistent/model"),
])
def test_bad_config_is_one_line_error_and_leaves_nothing(tmp_path, tiny_family, mutate, needle):
    cfg = {"merge_method": "ties", "base_model": str(tiny_family.base),
           "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in tiny_family.experts]}
    mutate(cfg)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output
    assert "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]


def test_corrupt_input_names_the_file(tmp_path, tiny_family):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_family.experts[0], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    cfg = {"merge_method": "ties", "base_model": str(tiny_family.base),
           "models": [{"model": str(broken), "parameters": {"weight": 1.0, "density": 0.5}}]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1 and "broken" in res.output and res.output.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_refuses_to_overwrite_a_non_empty_directory(tmp_path, tiny_family):
    cfg = _write_config(tmp_path, tiny_family)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1 and "not empty" in res.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q", "--overwrite"])
    assert res.exit_code == 0 and not (tmp_path / "out" / "keep.txt").exists()


def test_explicit_backend_that_cannot_run_the_method_is_an_error(tmp_path, tiny_family):
    cfg = _write_config(tmp_path, tiny_family)
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q", "--backend", "cuda"])
    assert res.exit_code == 1 and "backend 'cuda'" in res.output


def test_inspect_lists_tensors(tiny_family):
    res = CliRunner().invoke(main, ["inspect", str(tiny_family.base), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    base = load_file(str(tiny_family.base / "model.safetensors"))
    assert {t["name"]: t["shape"] for t in info["tensors"]} == {k: list(v.shape) for k, v in base.items()}


def test_env_reports_backends():
    res = CliRunner().invoke(main, ["env", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert set(info["backends"]) == {"torch", "cpu", "cuda", "triton"}
    assert "ties" in info["methods"]


def test_demo_tiny_runs_and_verifies(tmp_path):
    res = CliRunner().invoke(main, ["demo", "--preset", "tiny", "--cache-dir", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    assert "ratio merge / read floor" in res.output and "verified" in res.output


def test_console_entry_point_error_exit(tmp_path):
    """The installed module entry point: a missing config is a usage error, not a traceback."""
    res = subprocess.run([sys.executable, "-m", "pymerge.cli", "run", str(tmp_path / "nope.yml"), str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
