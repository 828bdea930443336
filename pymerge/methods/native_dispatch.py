"""The one rule for a method with a native CPU merge: use it when it can run the tensor; otherwise fall back
to the torch merge when the backend was picked automatically, and fail when the user asked for it by name."""

from __future__ import annotations

import logging
from typing import Callable

from ..errors import BackendUnavailable
from .base import TensorJob, TensorMerge

log = logging.getLogger("pymerge")


def native_or_torch(job: TensorJob, unsupported: str | None, native: Callable[[], TensorMerge],
                    torch_merge: Callable[[], TensorMerge]) -> TensorMerge:
    """``native()`` when ``unsupported`` is None, else ``torch_merge()`` (auto) or BackendUnavailable (explicit)."""
    if unsupported is None:
        return native()
    if job.backend_explicit:
        raise BackendUnavailable(f"tensor '{job.name}': backend 'cpu' cannot merge it: {unsupported}; "
                                 "use --backend torch (or auto)")
    log.debug("tensor %s: torch backend (%s)", job.name, unsupported)
    return torch_merge()
