"""What ``pymerge env`` reports: versions, backends available (and why not), native build details."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from . import __version__


def _triton_status() -> str:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "unavailable: triton is not installed (pip install triton)"
    import torch

    if not torch.cuda.is_available():
        return f"installed (triton {triton.__version__}); no GPU: kernels run only under TRITON_INTERPRET=1"
    return f"available (triton {triton.__version__})"


def environment_report() -> dict[str, Any]:
    import numpy
    import torch

    from ._native import build_info
    from .methods import method_names
    from .ops.backend import NATIVE_METHODS

    native = build_info()
    cuda_gpu = torch.cuda.is_available()
    backends = {
        "torch": "available (every method; the reference backend)",
        "cpu": (f"native extension loaded ({native['cpu_isa']} kernels); the default for "
                f"{', '.join(sorted(NATIVE_METHODS['cpu']))} (some parameter settings run on torch; see the "
                "README's method table)")
               if native["native"] and native.get("cpu_isa") else
               f"unavailable: {native.get('cpu_isa_reason') or native['reason']}",
        "cuda": ("unavailable: the extension was built without CUDA kernels" if not native.get("cuda_compiled")
                 else "unavailable: no CUDA GPU visible to torch" if not cuda_gpu
                 else f"kernels compiled for {native.get('cuda_archs')}; with --device cuda (not yet verified on "
                      f"a GPU): {', '.join(sorted(NATIVE_METHODS['cuda']))}"),
        "triton": _triton_status(),
    }
    return {
        "pymerge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "cuda_available": cuda_gpu,
        "backend_override": os.environ.get("PYMERGE_BACKEND") or None,
        "methods": ", ".join(method_names()),
        "backends": backends,
        "native_build": native,
    }
