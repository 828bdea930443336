"""Linear (model soups): theta = sum_i w_i theta_i / sum_i w_i  (normalize, the default) or sum_i w_i theta_i.

mergekit's ``linear``: every input model (the base too, when it is listed or configured) needs a ``weight``.
Deliberate difference: weights summing to zero with normalize on are an error here (mergekit writes inf/NaN).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


class _LinearMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        self.w = torch.tensor([float(p["weight"]) for p in job.model_params], dtype=torch.float32)
        self.normalize = bool(job.params["normalize"])
        if self.normalize and float(self.w.sum()) == 0.0:
            raise ConfigError(f"linear: the weights of tensor '{job.name}' sum to zero; set normalize: false "
                              "or change the weights")

    def map(self, chunk: Chunk) -> torch.Tensor:
        out = torch.zeros_like(chunk.data[0])
        for x, w in zip(chunk.data, self.w):
            out.add_(x * w)  # accumulate in input order, like the reference's addcmul loop
        if self.normalize:
            out /= self.w.sum()
        return out


class Linear(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _LinearMerge(job)


def linear_method() -> Method:
    spec = MethodSpec(
        name="linear",
        params=(ParamSpec("weight", float, per_model=True, required=True, doc="weight of the model"),
                ParamSpec("normalize", bool, default=True, doc="divide by the sum of weights")),
        needs_base=False, min_inputs=1, reference="https://arxiv.org/abs/2203.05482")
    return Linear(spec=spec, scratch_factor=1.0)
