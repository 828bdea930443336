"""Passthrough: copy the single input tensor, optionally times a per-model ``scale`` (mergekit's passthrough).

Used with ``slices`` to stack layer ranges of models (frankenmerges)."""

from __future__ import annotations

import torch

from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


class _PassthroughMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        self.scale = job.model_params[0].get("scale")

    def map(self, chunk: Chunk) -> torch.Tensor:
        x = chunk.data[0]
        return x if self.scale is None else x * float(self.scale)


class Passthrough(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _PassthroughMerge(job)


def passthrough_method() -> Method:
    spec = MethodSpec(name="passthrough",
                      params=(ParamSpec("scale", float, per_model=True, doc="optional factor on the tensor"),),
                      needs_base=False, min_inputs=1, max_inputs=1)
    return Passthrough(spec=spec, scratch_factor=0.5)
