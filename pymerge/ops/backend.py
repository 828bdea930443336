"""Backend and device selection: an explicit request that cannot be met is an error, never a fallback."""

from __future__ import annotations

import os

from ..errors import BackendUnavailable, ConfigError

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
DEVICES = ("auto", "cpu", "cuda")

# Methods each native backend runs (for some parameter combinations: a tensor the backend cannot run falls
# back to torch under 'auto' and is an error when the backend was named; methods/native_dispatch.py).
# On cpu, dare_* and della* run fused native passes; DELLA ranks its magnitudes with torch ops.
NATIVE_METHODS: dict[str, frozenset[str]] = {
    "cpu": frozenset({"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear",
                      "breadcrumbs", "breadcrumbs_ties"}),
    "cuda": frozenset({"task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear"}),
    "triton": frozenset({"task_arithmetic", "ties", "dare_ties", "dare_linear", "della", "della_linear"}),
}
# Methods the streaming GPU executor runs (pymerge/gpu/fused.py), with the cuda, triton or torch kernels.
GPU_METHODS = NATIVE_METHODS["cuda"]


def resolve_device(device: str | None) -> str:
    """'cpu' or 'cuda'. 'auto' is the CPU: on an H100 host the GPU engine gave the CPU backend's bits but was
    no faster end to end than its 16 cores (benchmarks/RESULTS.md §14), so it runs only when asked for with
    ``device='cuda'`` (an error when torch sees no CUDA device)."""
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("device 'cuda': torch sees no CUDA device; use --device cpu")
        return "cuda"
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
    if device == "cuda":
        return _resolve_gpu_backend(requested, method)
    if requested in ("cuda", "triton"):
        raise BackendUnavailable(f"backend '{requested}' runs on the GPU; add --device cuda")
    if requested == "auto":
        from .._native import cpu_isa_error

        bad_setting = cpu_isa_error()  # a PYMERGE_CPU_ISA that cannot run is an error, not a quiet torch merge
        if bad_setting is not None and method in NATIVE_METHODS["cpu"]:
            raise BackendUnavailable(bad_setting)
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
        from .._native import cpu_unavailable_reason

        raise BackendUnavailable(f"backend '{requested}' is not available: {cpu_unavailable_reason()}")
    return requested


def _resolve_gpu_backend(requested: str, method: str) -> str:
    """The kernel set of the streaming GPU executor: cuda (compiled), triton (importable) or torch (on GPU)."""
    if method not in GPU_METHODS:
        raise BackendUnavailable(f"device 'cuda' does not run merge method '{method}' yet (it runs "
                                 f"{', '.join(sorted(GPU_METHODS))}); use --device cpu")
    if requested in ("auto", "cuda"):
        from .._native import native_module

        mod = native_module()
        if mod is not None and hasattr(mod, "cuda_ties_map"):
            return "cuda"
        if requested == "cuda":
            raise BackendUnavailable("backend 'cuda': the CUDA kernels were not compiled (no nvcc at build time, "
                                     "or PYMERGE_NO_CUDA); see `pymerge env`")
    if requested in ("auto", "triton"):
        try:
            import triton  # noqa: F401
        except ImportError:
            if requested == "triton":
                raise BackendUnavailable("backend 'triton': triton is not installed") from None
        else:
            return "triton"
    if requested == "cpu":
        raise BackendUnavailable("backend 'cpu' does not run on device 'cuda'")
    return "torch"


def backend_built(name: str) -> bool:
    """Whether the compiled extension that holds backend ``name``'s kernels is importable."""
    from .._native import cpu_module, native_module

    return (cpu_module() if name == "cpu" else native_module()) is not None
