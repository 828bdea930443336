"""The one rule for a method with a native CPU merge: use it when it can run the tensor; otherwise fall back
to the torch merge when the backend was picked automatically, and fail when the user asked for it by name."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..errors import BackendUnavailable
from .base import Chunk, TensorJob, TensorMerge

NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def native_dtypes_unsupported(job: TensorJob) -> str | None:
    """Why the native kernels cannot read/write ``job``'s dtypes (None: one input dtype and an output dtype
    among float32/float16/bfloat16)."""
    dtypes = set(job.in_dtypes)
    if len(dtypes) != 1 or dtypes.pop() not in NATIVE_DTYPES or job.out_dtype not in NATIVE_DTYPES:
        return (f"inputs stored as {sorted({str(d) for d in job.in_dtypes})} -> {job.out_dtype}: the native "
                "kernels need one input dtype among float32/float16/bfloat16")
    return None

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


class NativeTaskVectorMerge(TensorMerge):
    """What the native task-vector merges share (task_arithmetic_native.py, dare_native.py): raw inputs, the
    base and experts of the job, their weights, ``normalize`` and ``lambda``."""

    raw_inputs = True

    def __init__(self, job: TensorJob):
        from ..ops import native_cpu

        self.nc = native_cpu
        self.job = job
        self.experts = job.expert_indices
        self.base = job.base_index
        self.weights = [float(job.model_params[i]["weight"]) for i in self.experts]
        self.normalize = bool(job.params["normalize"])
        self.lam = float(job.params["lambda"])

    def _inputs(self, chunk: Chunk) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base rows, expert rows) of a chunk, in their stored dtype."""
        raw = chunk.raw
        return raw[self.base], [raw[i] for i in self.experts]  # type: ignore[index]
