"""Linear (model soups): theta = sum_i w_i theta_i / sum_i w_i  (normalize, the default) or sum_i w_i theta_i.

mergekit's ``linear``: every input model (the base too, when it is listed or configured) needs a ``weight``.
The sum starts from the first product (not from 0), and the divisor is the weights' float64 sum rounded to
fp32: the same bits as the native weighted-sum kernel (and within an ulp of mergekit's).
Deliberate difference: weights summing to zero with normalize on are an error here (mergekit writes inf/NaN).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


class _LinearMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        weights = [float(p["weight"]) for p in job.model_params]
        self.w = torch.tensor(weights, dtype=torch.float32)
        self.normalize = bool(job.params["normalize"])
        # The divisor: the weights summed in input order in float64, rounded to fp32 once (as the native
        # weighted sum does, so both backends give the same bits).
        self.divisor = torch.tensor(sum(weights), dtype=torch.float32)
        if self.normalize and float(self.divisor) == 0.0:
            raise ConfigError(f"linear: the weights of tensor '{job.name}' sum to zero; set normalize: false "
                              "or change the weights")

    def map(self, chunk: Chunk) -> torch.Tensor:
        # w_0 x_0 + w_1 x_1 + ... in input order, each product and sum rounded to fp32
        out = chunk.data[0] * self.w[0]
        for x, w in zip(chunk.data[1:], self.w[1:]):
            out.add_(x * w)
        if self.normalize:
            out /= self.divisor
        return out


class _NativeLinearMerge(_LinearMerge):
    """The same sum on the native weighted-sum kernel, reading the stored bytes of every input once.

    A NaN or Inf input makes its output element NaN or Inf whatever the weights (NaN * w, Inf * 0 = NaN, and
    fp32 sums and narrowing keep them), so the executor's scan of the inputs is replaced by a scan of each
    output chunk, a quarter of the bytes for base + 3; only a chunk that has one scans the inputs, to name them
    (and finite inputs whose sum overflowed are let through, as the scan would).
    """

    raw_inputs = True
    finds_nonfinite = True

    def __init__(self, job: TensorJob):
        super().__init__(job)
        self.job = job
        self.weights = [float(p["weight"]) for p in job.model_params]

    def map(self, chunk: Chunk) -> torch.Tensor:
        from ..ops import native_cpu

        out = native_cpu.weighted_sum(chunk.raw, self.weights, normalize=self.normalize,  # type: ignore[arg-type]
                                      out_dtype=self.job.out_dtype)
        if self.nonfinite_found is not None and native_cpu.count_nonfinite([out])[0]:
            self.nonfinite_found()
        return out


class Linear(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        if job.backend == "cpu":
            from .native_dispatch import native_dtypes_unsupported, native_or_torch

            return native_or_torch(job, native_dtypes_unsupported(job), lambda: _NativeLinearMerge(job),
                                   lambda: _LinearMerge(job))
        return _LinearMerge(job)


def linear_method() -> Method:
    spec = MethodSpec(
        name="linear",
        params=(ParamSpec("weight", float, per_model=True, required=True, doc="weight of the model"),
                ParamSpec("normalize", bool, default=True, doc="divide by the sum of weights")),
        needs_base=False, min_inputs=1, reference="https://arxiv.org/abs/2203.05482")
    return Linear(spec=spec, scratch_factor=1.0)
