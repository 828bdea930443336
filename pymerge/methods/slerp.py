"""SLERP between the base a and one other model b, per tensor (mergekit's ``slerp``).

    d = <a/|a|, b/|b|> (norms below 1e-8 count as 1), clamped to [-1, 1]
    |d| > 0.9995:  theta = (1 - t) a + t b
    otherwise:     Omega = arccos d,  theta = [sin((1 - t) Omega) a + sin(t Omega) b] / sin Omega
t = 0 gives the base. One reduce pass (fp64 dot and norms), then the map pass.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..ops.exact_sum import ExactSum, row_sums
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge

DOT_THRESHOLD = 0.9995  # mergekit's switch to linear interpolation for (anti)collinear tensors
NORM_EPS = 1e-8


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(c_a, c_b) such that slerp = c_a * a + c_b * b, from |a|^2, |b|^2 and <a, b>."""
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > NORM_EPS else 1.0
    nb = nb if nb > NORM_EPS else 1.0
    d = max(-1.0, min(1.0, ab / (na * nb)))
    if abs(d) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(d)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s


class _SlerpMerge(TensorMerge):
    reduce_passes = 1

    def __init__(self, job: TensorJob):
        self.a = job.base_index
        self.b = job.expert_indices[0]
        self.t = float(job.params["t"])
        self.sums = ExactSum(3)  # |a|^2, |b|^2, <a, b>

    def reduce(self, p: int, chunk: Chunk) -> None:
        a = chunk.data[self.a].double()
        b = chunk.data[self.b].double()
        self.sums.add_rows(torch.stack([row_sums(a * a), row_sums(b * b), row_sums(a * b)], dim=1))

    def end_pass(self, p: int) -> None:
        self.ca, self.cb = slerp_coefficients(self.t, *self.sums.values())

    def map(self, chunk: Chunk) -> torch.Tensor:
        return chunk.data[self.a] * self.ca + chunk.data[self.b] * self.cb


class Slerp(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        if job.base_index is None or len(job.inputs) != 2:
            raise ConfigError("slerp needs a base_model and exactly one other model")
        return _SlerpMerge(job)


def slerp_method() -> Method:
    spec = MethodSpec(name="slerp",
                      params=(ParamSpec("t", float, required=True, doc="interpolation factor, 0 = base"),),
                      needs_base=True, min_inputs=2, max_inputs=2,
                      reference="https://en.wikipedia.org/wiki/Slerp")
    return Slerp(spec=spec, scratch_factor=1.5)
