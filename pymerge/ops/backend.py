"""Backend and device selection: an explicit request that cannot be met is an error, never a fallback."""

from __future__ import annotations

import os

from ..errors import BackendUnavailable, ConfigError

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
DEVICES = ("auto", "cpu", "cuda")

# Methods each native backend runs (for some parameter combinations: a tensor the backend cannot run falls
# back to torch under 'auto' and is an error when the backend was named; methods/native_dispatch.py).
# dare_* and della* draw their Philox masks natively and do the rest of their arithmetic with torch ops.
NATIVE_METHODS: dict[str, frozenset[str]] = {
    "cpu": frozenset({"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear"}),
    "cuda": frozenset(),
    "triton": frozenset(),
}


def resolve_device(device: str | None) -> str:
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        raise BackendUnavailable("device 'cuda': the GPU streaming executor is not implemented yet; use --device cpu")
    return "cpu"


def requested_backend(backend: str | None) -> str:
    """What the user asked for: ``backend`` unless it is None/'auto', then PYMERGE_BACKEND, else 'auto'."""
    if backend and backend.lower() != "auto":
        return backend.lower()
    return (os.environ.get("PYMERGE_BACKEND") or "auto").lower()


def resolve_backend(backend: str | None, method: str, device: str) -> str:
    """The backend that runs ``method``: ``backend``, or PYMERGE_BACKEND when that is 'auto'/None; 'auto' picks
    the fastest available."""
    requested = requested_backend(backend)
    if requested not in BACKENDS:
        raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, got {requested!r}")
    if requested == "auto":
        for name in ("cpu",):
            if method in NATIVE_METHODS[name] and backend_built(name):
                return name
        return "torch"
    if requested == "torch":
        return "torch"
    if method not in NATIVE_METHODS[requested]:
        raise BackendUnavailable(f"backend '{requested}' does not implement merge method '{method}' yet; "
                                 "use --backend torch (or auto)")
    if not backend_built(requested):
        from .._native import native_unavailable_reason

        raise BackendUnavailable(f"backend '{requested}' is not available: {native_unavailable_reason()}")
    return requested


def backend_built(name: str) -> bool:
    """Whether the compiled extension that holds backend ``name``'s kernels is importable."""
    from .._native import native_module

    return native_module() is not None
