"""Resume: a merge killed anywhere (SIGKILL included) and started again finishes with the bytes of an uninterrupted
run; the journal is checked on restart (a corrupted tensor or journal line is merged again); a partial run of a
different merge is refused, never reused or deleted silently; ``restart`` discards it.

Crash points come from the test hook ``PYMERGE_FAULT_AFTER_TENSORS=N`` (the process SIGKILLs itself once N
tensors are journaled) and from a child script that SIGKILLs itself in the middle of a write, just before the
final rename, or after a random delay.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

import pymerge
import pymerge.executor as executor_module
from pymerge.cli import main
from pymerge.errors import MergeError
from pymerge.io import journal as journal_module
from pymerge.io.atomic_dir import partial_bytes, partial_dir_for
from pymerge.io.journal import JOURNAL_NAME, Journal, JournalEntry, read_journal

from ._family import leftovers

SHARD = "40KB"  # several output shards, so the journal spans files
ROOT = Path(__file__).resolve().parents[2]

# The child runs the real CLI. PYMERGE_TEST_KILL picks an extra crash point:
#   write:K:HALF  SIGKILL after writing the first half of the rows of the K-th ShardedWriter.write call
#   commit        SIGKILL when the finished output is about to be renamed into place
#   slow:S:MARK   sleep S seconds per tensor and create MARK when the first tensor starts (the test kills it)
CHILD = r"""
import os, signal, sys, time
from pathlib import Path

kill = os.environ.get("PYMERGE_TEST_KILL", "")

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kill.startswith("write:"):
    from pymerge.io.safetensors_writer import ShardedWriter
    real, at, calls = ShardedWriter.write, int(kill.split(":")[1]), []

    def write(self, name, data, row_start=0):
        calls.append(name)
        if len(calls) == at:
            half = max(data.shape[0] // 2, 1) if data.dim() else 1
            real(self, name, data[:half].contiguous() if data.dim() else data, row_start)
            die()
        real(self, name, data, row_start)

    ShardedWriter.write = write
elif kill == "commit":
    from pymerge.io.atomic_dir import ResumableOutputDir
    ResumableOutputDir.commit = lambda self: die()
elif kill.startswith("slow:"):
    import pymerge.executor as ex
    _, delay, mark = kill.split(":", 2)
    real = ex.merge_tensor

    def slow(*args, **kwargs):
        Path(mark).touch()
        time.sleep(float(delay))
        return real(*args, **kwargs)

    ex.merge_tensor = slow

from pymerge.cli import main
main(sys.argv[1:], prog_name="pymerge")
"""


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama family (bf16, base + 3 experts) of this module's own: some tests touch its files."""
    from pymerge.synth import PRESETS, make_family

    root = tmp_path_factory.mktemp("resume_family")
    base, experts = make_family(root / "f", PRESETS["tiny"], n_experts=3, dtype=torch.bfloat16, seed=3)
    cfg = {"merge_method": "dare_ties", "base_model": str(base),
           "models": [{"model": str(p), "parameters": {"weight": 0.6 + 0.1 * i, "density": 0.4}}
                      for i, p in enumerate(experts)]}
    path = root / "dare.yml"
    path.write_text(yaml.safe_dump(cfg))
    clean = root / "clean"
    report = pymerge.merge(path, clean, quiet=True, out_shard_size=SHARD, seed=11)
    assert report.shards >= 3 and report.resumed_tensors == 0
    return {"cfg": path, "clean": clean, "tensors": report.tensors, "root": root, "dict": cfg}


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _same_as_clean(out: Path, family) -> None:
    got, want = _files(out), _files(family["clean"])
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name


def _resume(family, out: Path, **kw) -> pymerge.MergeReport:
    report = pymerge.merge(family["cfg"], out, quiet=True, out_shard_size=SHARD, seed=11, **kw)
    _same_as_clean(out, family)
    assert leftovers(out.parent) == []
    return report


def _child(family, out: Path, *, fault: int | None = None, kill: str = "", extra: tuple = ()) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (journal_module.FAULT_ENV, "PYMERGE_TEST_KILL")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if fault is not None:
        env[journal_module.FAULT_ENV] = str(fault)
    if kill:
        env["PYMERGE_TEST_KILL"] = kill
    args = [sys.executable, "-c", CHILD, "run", str(family["cfg"]), str(out), "-q", "--seed", "11",
            "--out-shard-size", SHARD, *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _killed(proc: subprocess.Popen) -> None:
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err


FAULT_POINTS = [0, 1, 13, "all"]


@pytest.fixture(scope="module")
def killed(family, tmp_path_factory):
    """Every crash point's child, started at once (each spends most of its time importing torch): name ->
    (output directory, process)."""
    root = tmp_path_factory.mktemp("killed")
    runs = {}
    for n in FAULT_POINTS:
        out = root / f"fault{n}" / "out"
        runs[f"fault{n}"] = (out, _child(family, out, fault=family["tensors"] if n == "all" else n))
    # 48 KiB makes the larger matrices take several chunks; the 9th write is in the middle of one of them
    out = root / "write" / "out"
    runs["write"] = (out, _child(family, out, kill="write:9", extra=("--max-memory", "48KB")))
    out = root / "commit" / "out"
    runs["commit"] = (out, _child(family, out, kill="commit"))
    yield runs
    for _out, proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("n", FAULT_POINTS)
def test_sigkill_after_n_journaled_tensors_then_resume(family, killed, n):
    out, proc = killed[f"fault{n}"]
    _killed(proc)
    n = family["tensors"] if n == "all" else n
    partial = partial_dir_for(out)
    assert not out.exists() and (partial / "fingerprint.json").is_file()
    assert len(read_journal(partial / JOURNAL_NAME)) == n  # exactly N lines, each fsynced before the kill
    report = _resume(family, out)
    assert report.resumed_tensors == n and report.tensors == family["tensors"]


def test_sigkill_mid_tensor_write_then_resume_with_another_budget(family, killed):
    out, proc = killed["write"]
    _killed(proc)
    journaled = read_journal(partial_dir_for(out) / JOURNAL_NAME)
    assert len(journaled) < 9
    report = _resume(family, out)  # the default budget: resident tensors, the bytes do not change
    assert report.resumed_tensors == len(journaled)


def test_sigkill_just_before_the_rename_then_resume(family, killed):
    out, proc = killed["commit"]
    _killed(proc)
    assert (partial_dir_for(out) / "output" / "pymerge_manifest.json").is_file()
    report = _resume(family, out)
    assert report.resumed_tensors == family["tensors"] and report.bytes_written == 0


def test_sigkill_after_a_random_delay_then_cli_resume(tmp_path, family):
    rng = random.Random(int(os.environ.get("PYMERGE_TEST_SEED", "0")) or time.time_ns())
    out, mark = tmp_path / "out", tmp_path / "started"
    delay = 0.03
    proc = _child(family, out, kill=f"slow:{delay}:{mark}")
    end = time.monotonic() + 120
    while not mark.exists() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    wait = rng.uniform(0, delay * family["tensors"])
    time.sleep(wait)
    proc.kill()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGKILL, 0), err
    # The same command again (without the hooks) finishes the job, whatever the point the kill landed on.
    res = CliRunner().invoke(main, ["run", str(family["cfg"]), str(out), "-q", "--seed", "11",
                                    "--out-shard-size", SHARD])
    if proc.returncode == 0:
        assert res.exit_code == 1 and "not empty" in res.output  # it had finished: nothing to resume
    else:
        assert res.exit_code == 0, (wait, res.output)
    _same_as_clean(out, family)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------- in-process crashes


def _interrupt_at(monkeypatch, family, out: Path, k: int, **kw) -> None:
    """Run the merge into ``out`` and stop it with a KeyboardInterrupt when the ``k``-th tensor starts."""
    real, calls = executor_module.merge_tensor, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(executor_module, "merge_tensor", stop)
        with pytest.raises(KeyboardInterrupt):
            pymerge.merge(family["cfg"], out, quiet=True, out_shard_size=SHARD, seed=11, **kw)
    assert leftovers(out.parent) == [partial_dir_for(out).name]


def _merged_names(monkeypatch) -> list[str]:
    """Record the name of every tensor the executor merges from now on."""
    real, names = executor_module.merge_tensor, []

    def record(plan, pt, *args, **kwargs):
        names.append(pt.name)
        return real(plan, pt, *args, **kwargs)

    monkeypatch.setattr(executor_module, "merge_tensor", record)
    return names


def test_corrupted_shard_bytes_are_merged_again(tmp_path, family, monkeypatch):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, family, out, 12)
    partial = partial_dir_for(out)
    entries = read_journal(partial / JOURNAL_NAME)
    assert len(entries) == 11
    victims = sorted((e for e in entries.values() if e.length), key=lambda e: e.name)[::4]
    for e in victims:
        with open(partial / "output" / e.shard, "r+b") as f:
            f.seek(e.offset + e.length // 2)
            b = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([b[0] ^ 0x40]))
    merged = _merged_names(monkeypatch)
    report = _resume(family, out)
    assert report.resumed_tensors == 11 - len(victims)
    assert {e.name for e in victims} <= set(merged) and not (set(entries) - {e.name for e in victims}) & set(merged)


def test_corrupted_and_torn_journal_lines_are_merged_again(tmp_path, family, monkeypatch):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, family, out, 9)
    path = partial_dir_for(out) / JOURNAL_NAME
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 8
    wrong_sum = JournalEntry.parse(lines[2])
    lines[2] = JournalEntry(wrong_sum.name, wrong_sum.shard, wrong_sum.offset, wrong_sum.length, "0" * 64).line()
    garbled = JournalEntry.parse(lines[5]).name
    lines[5] = b'{"name": "' + garbled.encode() + b'", "shard": 7}\n'
    torn = JournalEntry.parse(lines[7]).name
    lines[7] = lines[7][:30]  # a crash in the middle of the last append
    path.write_bytes(b"".join(lines))
    merged = _merged_names(monkeypatch)
    report = _resume(family, out)
    assert report.resumed_tensors == 5
    assert {wrong_sum.name, garbled, torn} <= set(merged) and len(merged) == family["tensors"] - 5


def test_journal_drops_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / JOURNAL_NAME
    a, b, c = (JournalEntry(f"t{i}", "model.safetensors", 100 * i, 7, f"{i:064x}") for i in range(3))
    j = Journal(path)
    j.append([a, b])
    j.close()
    with open(path, "ab") as f:
        f.write(c.line()[:-9])  # torn
    assert read_journal(path) == {"t0": a, "t1": b}
    j = Journal(path)
    j.append([c])
    j.close()
    assert read_journal(path) == {"t0": a, "t1": b, "t2": c}
    assert path.read_bytes() == a.line() + b.line() + c.line()


def test_full_disk_while_journaling_keeps_the_run_resumable(tmp_path, family, monkeypatch):
    out = tmp_path / "out"
    real, calls = Journal.append, []

    def append(self, entries):
        # Batches depend on timing, so fail the batch holding the 10th tensor, whichever batch that is.
        if sum(calls) + len(entries) >= 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        calls.append(len(entries))
        real(self, entries)

    with monkeypatch.context() as m:
        m.setattr(Journal, "append", append)
        with pytest.raises(MergeError, match="No space left on device.*run the same command again to resume$"):
            pymerge.merge(family["cfg"], out, quiet=True, out_shard_size=SHARD, seed=11)
    done = len(read_journal(partial_dir_for(out) / JOURNAL_NAME))
    assert done == sum(calls) < 10
    assert _resume(family, out).resumed_tensors == done


# ---------------------------------------------------------------------------------- refusals and --restart


def _changed(family, tmp_path, **change) -> Path:
    cfg = dict(family["dict"], **change)
    p = tmp_path / "changed.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("what", ["config", "seed", "layout", "inputs"])
def test_a_partial_run_of_another_merge_is_refused_until_restart(tmp_path, family, monkeypatch, what):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, family, out, 5)
    partial = partial_dir_for(out)
    before = {p.relative_to(partial): p.read_bytes() for p in partial.rglob("*") if p.is_file()}
    cfg, kw = family["cfg"], {"out_shard_size": SHARD, "seed": 11}
    expected = {"config": "config", "seed": "seed", "layout": "output layout", "inputs": "input checkpoints"}[what]
    if what == "config":
        cfg = _changed(family, tmp_path, parameters={"lambda": 0.9})
    elif what == "seed":
        kw["seed"] = 12
    elif what == "layout":
        kw["out_shard_size"] = "30KB"
    else:
        # Same header, new contents: the rewritten input keeps its size, but its mtime moves.
        victim = Path(family["dict"]["models"][0]["model"]) / "model.safetensors"
        st = victim.stat()
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        with pytest.raises(MergeError) as ei:
            pymerge.merge(cfg, out, quiet=True, **kw)
        msg = str(ei.value)
        assert f"whose {expected}" in msg and "--restart" in msg and str(partial) in msg
        after = {p.relative_to(partial): p.read_bytes() for p in partial.rglob("*") if p.is_file()}
        assert after == before  # refused without touching it
        res = CliRunner().invoke(main, ["run", str(cfg), str(out), "-q", "--seed", str(kw["seed"]),
                                        "--out-shard-size", kw["out_shard_size"]])
        assert res.exit_code == 1 and res.output.count("\n") == 1 and "--restart" in res.output
        res = CliRunner().invoke(main, ["run", str(cfg), str(out), "-q", "--seed", str(kw["seed"]),
                                        "--out-shard-size", kw["out_shard_size"], "--restart"])
        assert res.exit_code == 0, res.output
        assert "resumed" not in res.output and leftovers(tmp_path) == []
        fresh = tmp_path / "fresh"
        pymerge.merge(cfg, fresh, quiet=True, **kw)
        assert _files(out) == _files(fresh)
    finally:
        if what == "inputs":
            os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_restart_discards_a_matching_partial_run_too(tmp_path, family, monkeypatch):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, family, out, 7)
    merged = _merged_names(monkeypatch)
    report = _resume(family, out, restart=True)
    assert report.resumed_tensors == 0 and len(merged) == family["tensors"]


def test_a_locked_partial_run_is_refused(tmp_path, family, monkeypatch):
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, family, out, 4)
    fd = os.open(partial_dir_for(out), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another pymerge run holds it
        for restart in (False, True):
            with pytest.raises(MergeError, match="another pymerge run is writing"):
                pymerge.merge(family["cfg"], out, quiet=True, out_shard_size=SHARD, seed=11, restart=restart)
    finally:
        os.close(fd)
    assert _resume(family, out).resumed_tensors == 3


def test_a_partial_directory_without_fingerprint(tmp_path, family):
    out = tmp_path / "out"
    partial = partial_dir_for(out)
    (partial / "output").mkdir(parents=True)
    (partial / "output" / "model-00001-of-00004.safetensors").write_bytes(b"junk")
    with pytest.raises(MergeError, match="without a readable fingerprint.json.*--restart"):
        pymerge.merge(family["cfg"], out, quiet=True, out_shard_size=SHARD, seed=11)
    assert (partial / "output" / "model-00001-of-00004.safetensors").read_bytes() == b"junk"
    # Only a fingerprint being written when the crash came: nothing to lose, so it simply starts.
    for p in sorted(partial.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (partial / "fingerprint.json.tmp").write_text("{")
    assert _resume(family, out).resumed_tensors == 0


def test_free_space_check_counts_what_the_partial_run_already_holds(tmp_path, family, monkeypatch):
    import shutil
    from collections import namedtuple

    from pymerge.api import _tokenizer_sources
    from pymerge.io.disk_space import planned_bytes
    from pymerge.plan import build_plan
    from pymerge.sizes import parse_size

    out = tmp_path / "out"
    _interrupt_at(monkeypatch, family, out, 20)
    held = partial_bytes(out)
    assert held > 0
    plan = build_plan(family["cfg"], seed=11, out_shard_size=parse_size(SHARD, "s"))
    try:
        needed = planned_bytes(plan.shards, _tokenizer_sources(plan))
    finally:
        plan.close()
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 0, needed - held))
    with pytest.raises(MergeError, match=f"writes {needed} bytes"):  # starting over needs it all
        pymerge.merge(family["cfg"], out, quiet=True, out_shard_size=SHARD, seed=11, restart=True)
    assert _resume(family, out).resumed_tensors == 19  # resuming needs only what is not there yet
