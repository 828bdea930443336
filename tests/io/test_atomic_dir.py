"""AtomicOutputDir: commit, abort, refusal, overwrite, and no leftovers next to the target."""

import os

import pytest

from pymerge.errors import MergeError
from pymerge.io.atomic_dir import AtomicOutputDir


@pytest.fixture(autouse=True)
def _stay_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def listing(d):
    return sorted(p.name for p in d.iterdir())


def test_commit_moves_temp_into_place(tmp_path):
    final = tmp_path / "out"
    out = AtomicOutputDir(final)
    assert out.path.parent == tmp_path and out.path.name.startswith(".out.pymerge-tmp-")
    assert not final.exists()
    (out.path / "model.safetensors").write_bytes(b"abc")
    (out.path / "sub").mkdir()
    (out.path / "sub" / "x").write_text("y")
    assert out.commit() == final
    assert (final / "model.safetensors").read_bytes() == b"abc" and (final / "sub" / "x").read_text() == "y"
    assert listing(tmp_path) == ["out"]
    with pytest.raises(MergeError, match="already committed"):
        out.commit()
    out.abort()  # no-op after commit
    assert final.exists()


def test_final_dir_respects_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = AtomicOutputDir(tmp_path / "out")
        final = out.commit()
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o755


def test_abort_and_context_manager(tmp_path):
    out = AtomicOutputDir(tmp_path / "out")
    (out.path / "f").write_text("x")
    out.abort()
    out.abort()
    assert listing(tmp_path) == []

    with AtomicOutputDir(tmp_path / "out") as out:
        (out.path / "f").write_text("x")
    assert listing(tmp_path) == []  # left without commit → aborted

    with pytest.raises(RuntimeError):
        with AtomicOutputDir(tmp_path / "out") as out:
            (out.path / "f").write_text("x")
            raise RuntimeError("merge failed")
    assert listing(tmp_path) == []

    with AtomicOutputDir(tmp_path / "out") as out:
        (out.path / "f").write_text("x")
        out.commit()
    assert listing(tmp_path) == ["out"] and (tmp_path / "out" / "f").read_text() == "x"


def test_refuses_non_empty_dir_and_file(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("old")
    (tmp_path / "afile").write_text("old")
    with pytest.raises(MergeError, match="full.*not empty"):
        AtomicOutputDir(tmp_path / "full")
    with pytest.raises(MergeError, match="afile.*not a directory"):
        AtomicOutputDir(tmp_path / "afile")
    assert listing(tmp_path) == ["afile", "full"]  # nothing created, nothing touched


def test_existing_empty_dir_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    out = AtomicOutputDir(tmp_path / "out")
    (out.path / "f").write_text("new")
    out.commit()
    assert listing(tmp_path / "out") == ["f"] and listing(tmp_path) == ["out"]


def test_target_filled_during_merge_is_not_clobbered(tmp_path):
    out = AtomicOutputDir(tmp_path / "out")
    (out.path / "f").write_text("new")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "someone_elses").write_text("old")
    with pytest.raises(MergeError, match="not empty"):
        out.commit()
    assert listing(tmp_path / "out") == ["someone_elses"]
    out.abort()
    assert listing(tmp_path) == ["out"]


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_overwrite_replaces_old_output(tmp_path, kind):
    final = tmp_path / "out"
    if kind == "dir":
        final.mkdir()
        (final / "old").write_text("old")
    else:
        final.write_text("old")
    out = AtomicOutputDir(final, overwrite=True)
    (out.path / "new").write_text("new")
    out.commit()
    assert listing(final) == ["new"]
    assert listing(tmp_path) == ["out"]  # neither the temp dir nor the old copy is left behind


def test_creates_missing_parents(tmp_path):
    out = AtomicOutputDir(tmp_path / "a" / "b" / "out")
    (out.path / "f").write_text("x")
    assert out.commit() == tmp_path / "a" / "b" / "out"
    assert listing(tmp_path / "a" / "b") == ["out"]


def test_relative_final_path_stays_in_cwd(tmp_path):
    out = AtomicOutputDir("rel_out")
    assert out.path.parent == tmp_path
    assert out.commit() == tmp_path / "rel_out"
