"""Loads the compiled extension ``pymerge._C`` lazily, once, and says why when it cannot.

``import pymerge`` never imports the extension: the package works (on the torch backend) without it,
and a missing kernel becomes a clear ``BackendUnavailable`` at call time, not an import crash.
Setting ``PYMERGE_DISABLE_NATIVE=1`` makes the extension count as absent (to exercise the fallbacks).
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
    """Forget the import attempt, so the next call tries again (for tests)."""
    global _loaded, _module, _reason
    with _lock:
        _loaded, _module, _reason = False, None, None


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
    return info
