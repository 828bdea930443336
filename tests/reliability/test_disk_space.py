"""Free space: refused up front when the disk is too full; a disk filling up mid-merge is one clear error and
leaves a partial run that the same call finishes once there is room."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest
import yaml
from click.testing import CliRunner

import pymerge
from pymerge.cli import main
from pymerge.errors import MergeError
from pymerge.io import disk_space
from pymerge.io.safetensors_writer import ShardedWriter

from ._family import leftovers, linear_config, make_family

Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def family(tmp_path):
    return make_family(tmp_path / "f")


def _fake_free(monkeypatch, free):
    seen = []

    def fake(path):
        seen.append(str(path))
        return Usage(10**12, 10**12 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", fake)
    return seen


def _shard_bytes(cfg, shard_size="5GB"):
    from pymerge.plan import build_plan
    from pymerge.sizes import parse_size

    plan = build_plan(cfg, out_shard_size=parse_size(shard_size, "s"))
    try:
        return [s.file_size for s in plan.shards], [8 + len(s.header) for s in plan.shards]
    finally:
        plan.close()


def test_too_little_space_is_refused_before_writing(tmp_path, family, monkeypatch):
    cfg = linear_config(family)
    sizes, _ = _shard_bytes(cfg)
    needed = sum(sizes) + disk_space.EXTRAS_MARGIN  # the family has no tokenizer files
    seen = _fake_free(monkeypatch, needed - 1)
    out = tmp_path / "new" / "deeper" / "out"  # parent does not exist yet: its nearest ancestor is measured
    with pytest.raises(MergeError) as ei:
        pymerge.merge(cfg, out, quiet=True)
    msg = str(ei.value)
    assert str(out) in msg and f"{needed} bytes" in msg and f"{needed - 1} bytes" in msg
    assert "check_space=False" in msg and "--no-space-check" in msg
    assert seen == [str(tmp_path)]
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_exactly_enough_space_passes_and_override_skips_the_check(tmp_path, family, monkeypatch):
    cfg = linear_config(family)
    sizes, _ = _shard_bytes(cfg)
    _fake_free(monkeypatch, sum(sizes) + disk_space.EXTRAS_MARGIN)
    pymerge.merge(cfg, tmp_path / "a", quiet=True)
    seen = _fake_free(monkeypatch, 0)
    pymerge.merge(cfg, tmp_path / "b", quiet=True, check_space=False)
    assert seen == []
    assert (tmp_path / "b" / "model.safetensors").stat().st_size == sizes[0]


def test_tokenizer_files_count_toward_the_space_needed(tmp_path, tiny_family, monkeypatch):
    cfg = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}}
                                                for p in [tiny_family.base, *tiny_family.experts]]}
    sizes, _ = _shard_bytes(cfg)
    tok = sum((tiny_family.base / f).stat().st_size for f in pymerge.io.output_extras.TOKENIZER_FILES
              if (tiny_family.base / f).is_file())
    assert tok > 0
    needed = sum(sizes) + disk_space.EXTRAS_MARGIN + tok
    _fake_free(monkeypatch, needed - 1)
    with pytest.raises(MergeError, match=f"writes {needed} bytes"):
        pymerge.merge(cfg, tmp_path / "out", quiet=True)


def test_cli_refuses_and_no_space_check_overrides(tmp_path, family, monkeypatch):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(linear_config(family)))
    _fake_free(monkeypatch, 1000)
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: not enough free space for ") and "1000 bytes" in lines[0]
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q", "--no-space-check"])
    assert res.exit_code == 0, res.output


def _failing_write(monkeypatch, fail_at, err):
    """Make the ``fail_at``-th ShardedWriter.write (1-based) raise ``err``; returns the bytes written before."""
    real = ShardedWriter.write
    state = {"calls": 0, "bytes": 0}

    def write(self, name, data, row_start=0):
        state["calls"] += 1
        if state["calls"] == fail_at:
            state["failed_tensor"] = name
            raise err
        real(self, name, data, row_start)
        state["bytes"] += data.numel() * data.element_size()
        state.setdefault("written", []).append(name)

    monkeypatch.setattr(ShardedWriter, "write", write)
    return state


@pytest.mark.parametrize("code, reason", [(errno.ENOSPC, "ENOSPC"), (errno.EIO, "EIO"), (errno.EDQUOT, "EDQUOT")])
@pytest.mark.parametrize("budget", [None, 24 * 1024], ids=["resident", "chunked"])
def test_disk_full_mid_merge_names_the_file_and_the_bytes_left(tmp_path, family, monkeypatch, code, reason,
                                                               budget):
    cfg = linear_config(family)
    sizes, headers = _shard_bytes(cfg, "20KB")
    assert len(sizes) == 3
    state = _failing_write(monkeypatch, 3, OSError(code, "No space left on device"))
    out = tmp_path / "out"
    with pytest.raises(MergeError) as ei:
        pymerge.merge(cfg, out, quiet=True, out_shard_size="20KB", max_memory=budget, check_space=False)
    msg = str(ei.value)
    assert "\n" not in msg
    left = sum(sizes) - sum(headers) - state["bytes"]
    assert f"; {left} bytes" in msg and "still to write" in msg and f"({reason})" in msg
    shard = next(f"model-0000{i + 1}-of-00003.safetensors" for i in range(3)
                 if state["failed_tensor"] in _names_in_shard(cfg, i))
    assert f"writing {out / shard} failed" in msg
    # The partial run stays for the next one: once there is room again, the same call finishes it.
    assert msg.endswith("free some space and run the same command again to resume")
    assert not out.exists() and leftovers(tmp_path) == [".out.pymerge-partial"]
    monkeypatch.undo()
    report = pymerge.merge(cfg, out, quiet=True, out_shard_size="20KB", max_memory=budget, check_space=False)
    finished = set(state["written"]) - {state["failed_tensor"]}  # tensors are merged one after the other
    assert report.resumed_tensors == len(finished) and report.tensors == 3
    if budget is None:
        assert len(finished) == 2  # one write per tensor: the first two were complete
    pymerge.merge(cfg, tmp_path / "clean", quiet=True, out_shard_size="20KB")
    assert _all_bytes(out) == _all_bytes(tmp_path / "clean") and leftovers(tmp_path) == []


def _all_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _names_in_shard(cfg, i):
    from pymerge.plan import build_plan

    plan = build_plan(cfg, out_shard_size=20 * 1024)
    try:
        return {t.name for t in plan.shards[i].tensors}
    finally:
        plan.close()


def test_other_os_errors_are_not_disguised_as_disk_errors(tmp_path, family, monkeypatch):
    _failing_write(monkeypatch, 1, OSError(errno.EBADF, "Bad file descriptor"))
    with pytest.raises(OSError) as ei:
        pymerge.merge(linear_config(family), tmp_path / "out", quiet=True)
    assert not isinstance(ei.value, MergeError) and ei.value.errno == errno.EBADF
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failing_fsync_at_close_and_failing_extras_are_reported(tmp_path, family, monkeypatch):
    cfg = linear_config(family)

    def bad_close(self):
        self.abort()
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as m:
        m.setattr(ShardedWriter, "close", bad_close)
        with pytest.raises(MergeError, match=r"writing .*out failed: Input/output error \(EIO\).*to resume$"):
            pymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [".out.pymerge-partial"]

    import pymerge.api as api

    def full_manifest(out_dir, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "pymerge_manifest.json"))

    monkeypatch.setattr(api, "write_manifest", full_manifest)
    with pytest.raises(MergeError) as ei:
        pymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert f"writing {tmp_path / 'out' / 'pymerge_manifest.json'} failed" in str(ei.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == [".out.pymerge-partial"]
    monkeypatch.undo()
    assert pymerge.merge(cfg, tmp_path / "out", quiet=True).resumed_tensors == 3  # journaled before the fsync
    assert leftovers(tmp_path) == [] and pymerge.verify(tmp_path / "out").tensors == 3


def test_cli_disk_full_is_one_line(tmp_path, family, monkeypatch):
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(linear_config(family)))
    _failing_write(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: writing {tmp_path / 'out' / 'model.safetensors'} failed")
    assert lines[0].endswith("run the same command again to resume")
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == [".out.pymerge-partial"]
