"""Triton kernels, one file per op (installed as ``pymerge.triton_kernels``).

Importing this package does not import Triton; each op module does. ``triton_unavailable_reason()``
tells the backend dispatcher whether the op modules can be used at all.
"""

from __future__ import annotations

from typing import Optional


def triton_unavailable_reason() -> Optional[str]:
    """Why Triton kernels cannot be imported here (the ImportError text), or None when they can."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
