"""pymerge works without its compiled extension, and says why it is missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pymerge import _native
from pymerge.errors import BackendUnavailable


@pytest.fixture
def without_native(monkeypatch):
    """Make `import pymerge._C` fail as if the extension were not built, then restore it."""
    monkeypatch.setitem(sys.modules, "pymerge._C", None)  # the import system then raises ImportError
    _native._reset()
    yield
    monkeypatch.undo()
    _native._reset()


def test_missing_extension_is_reported(without_native):
    from pymerge.ops import native_cpu, native_cuda

    assert _native.native_module() is None
    reason = _native.native_unavailable_reason()
    assert reason is not None and "Error: " in reason and "pymerge._C" in reason
    with pytest.raises(BackendUnavailable, match="the TIES kernel needs the compiled extension pymerge._C"):
        _native.require_native("the TIES kernel")
    info = _native.build_info()
    assert info["native"] is False and info["reason"] == reason
    assert info["cuda_compiled"] is False and info["openmp"] is False
    with pytest.raises(BackendUnavailable, match="native CPU cast"):
        native_cpu.cast(torch.zeros(3), torch.float16)
    with pytest.raises(BackendUnavailable, match="native CPU weighted_sum"):
        native_cpu.weighted_sum([torch.zeros(3)], [1.0])
    with pytest.raises(BackendUnavailable, match="native CUDA cast"):
        native_cuda.cast(torch.zeros(3), torch.float16)
    assert "pymerge._C is not available" in native_cuda.cuda_unavailable_reason()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PYMERGE_DISABLE_NATIVE", "1")
    _native._reset()
    try:
        assert _native.native_module() is None
        assert "PYMERGE_DISABLE_NATIVE" in _native.native_unavailable_reason()
    finally:
        monkeypatch.delenv("PYMERGE_DISABLE_NATIVE")
        _native._reset()


def test_import_is_lazy_and_attempted_once(without_native, monkeypatch):
    calls = []
    real_import = _native.importlib.import_module
    monkeypatch.setattr(_native.importlib, "import_module", lambda name: calls.append(name) or real_import(name))
    for _ in range(3):
        _native.native_module()
        _native.native_unavailable_reason()
    assert calls == ["pymerge._C"]


def test_package_imports_without_extension_in_a_fresh_process():
    code = (
        "import sys; sys.modules['pymerge._C'] = None\n"
        "import pymerge, pymerge.ops.native_cpu, pymerge.ops.native_cuda\n"
        "from pymerge._native import build_info\n"
        "info = build_info(); assert not info['native'], info; print(info['reason'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYMERGE_DISABLE_NATIVE"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pymerge._C" in proc.stdout


def test_loaded_extension_reports_itself():
    _native._reset()
    module = _native.native_module()
    if module is None:
        pytest.skip(f"pymerge._C is not built: {_native.native_unavailable_reason()}")
    info = _native.build_info()
    assert info["native"] is True and info["reason"] is None
    assert _native.require_native("anything") is module
    assert set(info) >= {"cuda_compiled", "cuda_archs", "cuda_version", "openmp", "compiler"}
