"""Ctrl-C: ``pymerge run`` interrupted mid-merge exits 130 with one line ``error: interrupted (...)``, keeps its
partial run, and the same command then finishes it with the bytes of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from click.testing import CliRunner

from pymerge.cli import main

from ._family import leftovers, ties_config, make_family

# The child runs the real CLI; merge_tensor is wrapped so that the first tensor is merged and written for real,
# then the second one signals "started" and blocks, which is where the SIGINT lands.
CHILD = r"""
import signal, sys, time
from pathlib import Path

# A shell may start background jobs with SIGINT ignored, and Python keeps an inherited SIG_IGN: restore the
# default Ctrl-C behaviour so the test does not depend on how pytest itself was launched.
signal.signal(signal.SIGINT, signal.default_int_handler)

import pymerge.executor as ex

real = ex.merge_tensor
calls = []

def slow(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        Path(sys.argv[1]).write_text("started")
        time.sleep(60)
    return real(*args, **kwargs)

ex.merge_tensor = slow
from pymerge.cli import main
main(sys.argv[2:], prog_name="pymerge")
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"merge ended before it could be interrupted (rc {proc.returncode}): {err}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("merge did not start in time")
        time.sleep(0.02)


def test_sigint_mid_merge_exits_130_and_the_same_command_resumes(tmp_path):
    paths = make_family(tmp_path / "f")
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump(ties_config(paths)))
    work = tmp_path / "work"
    work.mkdir()
    marker, out = tmp_path / "started", work / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), "run", str(cfg), str(out), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(marker, proc, timeout=60)
    partial = work / ".out.pymerge-partial"
    assert any((partial / "output").iterdir())  # the merge really was writing its output
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert stderr == (f"error: interrupted (partial merge kept in {partial}; run the same command again to "
                      "resume)\n") and stdout == ""
    assert [p.name for p in work.iterdir()] == [partial.name] and leftovers(work) == [partial.name]

    res = CliRunner().invoke(main, ["run", str(cfg), str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "3 tensors (1 resumed)" in res.output  # the first tensor was finished before the interrupt
    assert leftovers(work) == []
    clean = tmp_path / "clean"
    assert CliRunner().invoke(main, ["run", str(cfg), str(clean), "-q"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    for f in clean.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
