"""Loads the compiled extension ``pymerge._C`` lazily, once, and says why when it cannot.

``import pymerge`` never imports the extension: the package works (on the torch backend) without it,
and a missing kernel becomes a clear ``BackendUnavailable`` at call time, not an import crash.
Setting ``PYMERGE_DISABLE_NATIVE=1`` makes the extension count as absent (to exercise the fallbacks).

The CPU kernels also come compiled for the x86-64 levels v3 (AVX2) and v4 (AVX-512), as ``pymerge._C_x86_64_v3``
and ``pymerge._C_x86_64_v4`` (CMakeLists.txt). ``cpu_module()`` imports the highest level that was built and
that this CPU runs (asked of ``_C`` first: importing a module whose instructions the CPU lacks could crash);
``PYMERGE_CPU_ISA=default|x86-64-v3|x86-64-v4`` picks one by name, and is an error when that one cannot run.
Every level writes the same bits (tests/native/test_cpu_levels.py), only faster.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType
from typing import Any, Optional

from pymerge.errors import BackendUnavailable

_lock = threading.Lock()
_loaded = False
_module: Optional[ModuleType] = None
_reason: Optional[str] = None
_cpu_loaded = False
_cpu_module: Optional[ModuleType] = None
_cpu_reason: Optional[str] = None

# The CPU kernel modules by -march level, best first: (PYMERGE_CPU_ISA name, x86-64 level, module).
CPU_LEVELS = (("x86-64-v4", 4, "pymerge._C_x86_64_v4"), ("x86-64-v3", 3, "pymerge._C_x86_64_v3"))


def _load() -> None:
    global _loaded, _module, _reason
    with _lock:
        if _loaded:
            return
        if os.environ.get("PYMERGE_DISABLE_NATIVE", "") not in ("", "0"):
            _module, _reason = None, "disabled by PYMERGE_DISABLE_NATIVE"
        else:
            try:
                _module, _reason = importlib.import_module("pymerge._C"), None
            except ImportError as exc:  # not built, or built for another Python / missing shared library
                _module, _reason = None, f"{type(exc).__name__}: {exc}"
        _loaded = True


def _reset() -> None:
    """Forget the import attempts, so the next call tries again (for tests)."""
    global _loaded, _module, _reason, _cpu_loaded, _cpu_module, _cpu_reason
    with _lock:
        _loaded, _module, _reason = False, None, None
        _cpu_loaded, _cpu_module, _cpu_reason = False, None, None


def _import_level(base: ModuleType, level: int, name: str) -> tuple[Optional[ModuleType], str]:
    """The module of one -march level, or None and why not (not supported by this CPU, or not built)."""
    if not base.cpu_supports_level(level):
        return None, f"this CPU does not support x86-64-v{level}"
    try:
        return importlib.import_module(name), ""
    except ImportError as exc:  # not built (another architecture, an old compiler, PYMERGE_CPU_LEVELS=OFF)
        return None, f"{name} is not available ({type(exc).__name__}: {exc})"


def _load_cpu() -> None:
    global _cpu_loaded, _cpu_module, _cpu_reason
    base = native_module()
    with _lock:
        if _cpu_loaded:
            return
        _cpu_loaded = True
        if base is None:
            _cpu_module, _cpu_reason = None, _reason
            return
        wanted = os.environ.get("PYMERGE_CPU_ISA", "").strip() or "auto"
        if wanted == "default":
            _cpu_module = base
            return
        names = [level[0] for level in CPU_LEVELS]
        if wanted != "auto" and wanted not in names:
            _cpu_module, _cpu_reason = None, (
                f"PYMERGE_CPU_ISA={wanted!r} is not one of auto, default, " + ", ".join(names))
            return
        for name, level, module_name in CPU_LEVELS:
            if wanted not in ("auto", name):
                continue
            module, why = _import_level(base, level, module_name)
            if module is not None:
                _cpu_module = module
                return
            if wanted == name:
                _cpu_module, _cpu_reason = None, f"PYMERGE_CPU_ISA={name}: {why}"
                return
        _cpu_module = base  # auto: no level module runs here; the default build always does


def cpu_module() -> Optional[ModuleType]:
    """The module whose CPU kernels to call (the best -march level; module docstring), or None when absent."""
    _load_cpu()
    return _cpu_module


def cpu_unavailable_reason() -> Optional[str]:
    """Why there is no CPU kernel module (the import error, or a bad PYMERGE_CPU_ISA), or None."""
    _load_cpu()
    return None if _cpu_module is not None else _cpu_reason


def cpu_isa_error() -> Optional[str]:
    """The error of a PYMERGE_CPU_ISA setting that names no runnable kernel module, or None."""
    reason = cpu_unavailable_reason()
    return reason if reason is not None and reason.startswith("PYMERGE_CPU_ISA") else None


def require_cpu(feature: str) -> ModuleType:
    """``cpu_module()``; raises BackendUnavailable naming ``feature`` and the reason when there is none."""
    module = cpu_module()
    if module is None:
        bad_setting = cpu_isa_error()
        if bad_setting is not None:
            raise BackendUnavailable(f"{feature} is unavailable: {bad_setting}")
        return require_native(feature)
    return module


def native_module() -> Optional[ModuleType]:
    """The loaded ``pymerge._C`` module, or None when it cannot be imported (tried once, lazily)."""
    _load()
    return _module


def native_unavailable_reason() -> Optional[str]:
    """Why ``pymerge._C`` could not be imported (the ImportError text), or None when it is loaded."""
    _load()
    return _reason


def require_native(feature: str) -> ModuleType:
    """The ``pymerge._C`` module; raises BackendUnavailable naming ``feature`` and the reason when absent."""
    module = native_module()
    if module is None:
        raise BackendUnavailable(
            f"{feature} needs the compiled extension pymerge._C, which is not available "
            f"({_reason}); reinstall pymerge with a C++17 compiler (pip install .), "
            "or use the torch backend"
        )
    return module


def build_info() -> dict[str, Any]:
    """How the native extension was built: native, reason, cuda_compiled, cuda_archs, openmp, compiler, ..."""
    module = native_module()
    info: dict[str, Any] = {
        "native": module is not None,
        "reason": _reason,
        "cuda_compiled": False,
        "cuda_archs": [],
        "cuda_version": None,
        "openmp": False,
        "compiler": None,
    }
    if module is not None:
        info.update(module.build_info())
        cpu = cpu_module()
        info["cpu_isa"] = cpu.build_info()["cpu_isa"] if cpu is not None else None
        info["cpu_isa_reason"] = _cpu_reason
    return info
