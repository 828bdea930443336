"""Model Stock (Jang et al. 2024), mergekit's ``model_stock``: needs the base and N >= 2 fine-tunes.

    c = mean over pairs i<j of cos(tau_i, tau_j)   (|tau_i||tau_j| clamped at 1e-6, cos clamped to [-1, 1])
    t = N c / (1 + (N - 1) c)    (0 where |1 + (N - 1) c| < 1e-6: keep the base)
    theta = t * mean_i(theta_i) + (1 - t) * theta_0
per tensor, or per row with ``filter_wise: true`` (rows of the last dimension). One reduce pass accumulates
the N x N Gram matrix of the task vectors (fp64 row sums, combined exactly).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..ops.exact_sum import ExactSum
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge


def stock_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t from Gram matrices [..., N, N] of task vectors (fp64)."""
    n = gram.shape[-1]
    norms = torch.sqrt(torch.diagonal(gram, dim1=-2, dim2=-1))
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            cos.append((gram[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))


class _StockMerge(TensorMerge):
    reduce_passes = 1

    def __init__(self, job: TensorJob):
        self.job = job
        self.experts = job.expert_indices
        self.filter_wise = bool(job.params["filter_wise"])
        self.last = job.shape[-1] if job.shape else 1
        n = len(self.experts)
        self.gram = None if self.filter_wise else ExactSum(n * n)
        self.parts: list[torch.Tensor] = []

    def _vectors(self, chunk: Chunk) -> torch.Tensor:
        """Task vectors [N, vectors, length], one per row of the last dimension (filter_wise)."""
        tau = (chunk.data[self.experts] - chunk.data[self.job.base_index]).double()
        return tau.reshape(len(self.experts), -1, self.last)

    def reduce(self, p: int, chunk: Chunk) -> None:
        n = len(self.experts)
        if self.filter_wise:
            v = self._vectors(chunk)  # [N, vectors, length]; whole vectors are always inside one chunk
            g = torch.stack([torch.stack([(v[i] * v[j]).sum(-1) for j in range(n)], -1) for i in range(n)], -2)
            self.parts.append(stock_ratio(g).to(torch.float32))
        else:
            tau = (chunk.data[self.experts] - chunk.data[self.job.base_index]).double()  # [N, rows, cols]
            self.gram.add_rows(torch.stack([(tau[i] * tau[j]).sum(-1) for i in range(n) for j in range(n)], dim=1))

    def end_pass(self, p: int) -> None:
        if not self.filter_wise:
            n = len(self.experts)
            gram = torch.tensor(self.gram.values(), dtype=torch.float64).reshape(n, n)
            self.t = stock_ratio(gram).to(torch.float32)
        self._next = 0

    def map(self, chunk: Chunk) -> torch.Tensor:
        data = chunk.data
        avg = sum(data[i] for i in self.experts) / len(self.experts)
        base = data[self.job.base_index]
        if self.filter_wise:
            t = self.parts[self._next].reshape(-1, 1)
            self._next += 1
            shape = base.shape
            out = t * avg.reshape(-1, self.last) + (1 - t) * base.reshape(-1, self.last)
            return out.reshape(shape)
        return self.t * avg + (1 - self.t) * base


class ModelStock(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        if job.base_index is None or len(job.expert_indices) < 2:
            raise ConfigError("model_stock needs a base_model and at least two other models")
        return _StockMerge(job)


def model_stock_method() -> Method:
    spec = MethodSpec(name="model_stock",
                      params=(ParamSpec("filter_wise", bool, default=False, doc="one ratio per row"),),
                      needs_base=True, min_inputs=3, reference="https://arxiv.org/abs/2403.19522")
    return ModelStock(spec=spec, scratch_factor=2.0)
