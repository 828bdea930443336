"""Backend and device selection: an explicit request that cannot be met is an error, never a fallback."""

from __future__ import annotations

import os

from ..errors import BackendUnavailable, ConfigError

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
DEVICES = ("auto", "cpu", "cuda")

# Methods each native backend runs end to end. The native kernels of the engine-core issue are the dtype
# casts and the weighted sum; the fused merge kernels come with the CPU/GPU backend issues.
NATIVE_METHODS: dict[str, frozenset[str]] = {"cpu": frozenset(), "cuda": frozenset(), "triton": frozenset()}


def resolve_device(device: str | None) -> str:
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        raise BackendUnavailable("device 'cuda': the GPU streaming executor is not implemented yet; use --device cpu")
    return "cpu"


def resolve_backend(backend: str | None, method: str, device: str) -> str:
    """The backend that runs ``method``: PYMERGE_BACKEND or ``backend``; 'auto' picks the fastest available."""
    requested = (backend or os.environ.get("PYMERGE_BACKEND") or "auto").lower()
    if requested not in BACKENDS:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "auto":
        for name in ("cpu",):
            if method in NATIVE_METHODS[name] and _native_ok(name):
                return name
        return "torch"
    if requested == "torch":
        return "torch"
    if method not in NATIVE_METHODS[requested]:
        raise BackendUnavailable(f"backend '{requested}' does not implement merge method '{method}' yet; "
                                 "use --backend torch (or auto)")
    if not _native_ok(requested):
        from .._native import native_unavailable_reason

        raise BackendUnavailable(f"backend '{requested}' is not available: {native_unavailable_reason()}")
    return requested


def _native_ok(name: str) -> bool:
    from .._native import native_module

    return native_module() is not None
