"""``pymerge bench`` end to end on the tiny preset: every requested (method, tool) row is timed or says why not."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from pymerge.bench import method_config
from pymerge.cli import main
from pymerge.ops.backend import NATIVE_METHODS, backend_built


def test_bench_tiny_preset_rows_and_json(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--preset", "tiny", "--methods", "ties,slerp", "--tools", "cpu,torch",
                                    "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work"),
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    rows = {(r["method"], r["tool"]): r for r in data["runs"]}
    assert set(rows) == {(m, t) for m in ("ties", "slerp")
                         for t in ("read floor", "write floor", "pymerge-cpu", "pymerge-torch")}
    assert rows[("ties", "pymerge-torch")]["seconds"] > 0 and rows[("slerp", "pymerge-torch")]["seconds"] > 0
    # slerp has no native kernel: its cpu row says so instead of silently timing the torch backend
    assert rows[("slerp", "pymerge-cpu")]["seconds"] is None and "n/a" in rows[("slerp", "pymerge-cpu")]["note"]
    if backend_built("cpu") and "ties" in NATIVE_METHODS["cpu"]:
        assert rows[("ties", "pymerge-cpu")]["seconds"] > 0
    assert not any(r["failed"] for r in data["runs"])
    # the floor covers exactly the models a method reads: slerp reads two of the four
    assert rows[("slerp", "read floor")]["input_bytes"] < rows[("ties", "read floor")]["input_bytes"]
    assert "x floor" in res.output and list((tmp_path / "work").glob("*-pymerge*")) == []
    # the write floor: the base's tensor bytes written and fsynced, its file gone; the I/O floor is the larger
    assert data["write_floor"]["bytes"] == data["read_floor"]["bytes"][sorted(data["read_floor"]["bytes"])[0]]
    assert data["write_floor"]["seconds"] > 0 and list((tmp_path / "work").glob(".pymerge-write-floor*")) == []
    for (method, tool), r in rows.items():
        assert r["io_floor_seconds"] == max(rows[(method, "read floor")]["seconds"], data["write_floor"]["seconds"])
        if r["seconds"] is not None:
            assert r["x_io_floor"] == r["seconds"] / r["io_floor_seconds"]


def test_bench_a_user_config_and_bad_names(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["bench", "--preset", "tiny", "--methods", "linear", "--tools", "torch",
                               "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "work")])
    assert res.exit_code == 0, res.output
    base, *experts = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    cfg = tmp_path / "mine.yml"
    cfg.write_text(yaml.safe_dump(method_config("task_arithmetic", base, experts, "bfloat16")))
    res = runner.invoke(main, ["bench", "--config", str(cfg), "--tools", "torch", "--work-dir", str(tmp_path / "w2")])
    assert res.exit_code == 0, res.output
    assert "task_arithmetic   pymerge-torch" in res.output
    res = runner.invoke(main, ["bench", "--methods", "nope", "--tools", "torch"])
    assert res.exit_code == 2 and "unknown method nope" in res.output
    res = runner.invoke(main, ["bench", "--tools", "gpu"])
    assert res.exit_code == 2 and "unknown tool gpu" in res.output
