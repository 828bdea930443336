"""WIDEN (Yu et al., 2024): merge by weight disentanglement into magnitudes and directions.

For a 2-D weight W (out x in; an input-embedding table is taken transposed, i.e. per token row), per column j:
    m_t[j]   = ||W_t[:, j]||,   dm_t[j] = |m_t[j] - m_0[j]|,   dd_t[j] = 1 - cos(W_t[:, j], W_0[:, j])
    R_t(x)   = rank of x[j] among the columns of model t / n    (stable ascending argsort; in [0, 1))
    score(R) = softmax_t(R_t[j]),  overwritten with ``score_calibration_value`` where
               R_t[j] > mean_j R_t * ``above_average_value_ratio``
    w_t[j]   = (score(R(dm))_t[j] + score(R(dd))_t[j]) / 2
    theta    = theta_0 + sum_t w_t[j] tau_t[:, j]
1-D tensors: score over |tau_t| itself (no ranks), theta = theta_0 + sum_t score_t tau_t. Scores are not
renormalised after the calibration (as in the reference).

Reference: yule-BUAA/MergeLLM, ``model_merging_methods/merging_methods.py::widen_merging`` (parameter names and
defaults are its own). Column statistics are float64 sums of w0^2, tau^2 and w0*tau in fixed row blocks (the
same bits for any chunking); m_t - m_0 and 1 - cos are computed from them without cancellation. Deliberate
differences (docs/methods/research.md): the above-average test on ranks is exact (2k > (n - 1) * ratio for rank
k/n; the reference compares with an fp32 mean), a zero column makes 1 - cos = 1 (the reference divides by zero),
and the transposed-embedding rule matches the usual embedding names, not only ``model.embed_tokens.weight``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..ops.column_sums import ColumnSums
from ..ops.consensus import stack_sum
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge

_EMBEDDING_RE = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|tok_embeddings)\.weight$")

_PARAMS = (
    ParamSpec("above_average_value_ratio", float, default=1.0,
              doc="entries whose significance exceeds ratio x the model's mean get the calibration score"),
    ParamSpec("score_calibration_value", float, default=1.0, doc="score given to the above-average entries"),
)


def is_input_embedding(name: str) -> bool:
    """Input-embedding tables, which the reference transposes (its columns are then the tokens)."""
    return bool(_EMBEDDING_RE.search(name))


def rank_scores(sig: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """Scores of ``sig[T, n]`` (per model, per column): softmax over models of the within-model ranks k/n,
    set to ``calibration`` where k/n > mean(k/n) * ratio, i.e. 2k > (n - 1) * ratio."""
    t, n = sig.shape
    order = torch.argsort(sig, dim=1, stable=True)
    k = torch.empty_like(order)
    k.scatter_(1, order, torch.arange(n).expand(t, n).contiguous())
    scores = torch.softmax(k.to(torch.float64) / n, dim=0)
    return torch.where(2 * k.to(torch.float64) > (n - 1) * ratio, calibration, scores)


def value_scores(sig: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """Scores of raw significances ``sig[T, n]``: softmax over models, ``calibration`` above ratio x the mean."""
    scores = torch.softmax(sig, dim=0)
    return torch.where(sig > sig.mean(dim=1, keepdim=True) * ratio, calibration, scores)


def disentangled_weights(s00: torch.Tensor, stt: torch.Tensor, s0t: torch.Tensor, ratio: float,
                         calibration: float) -> torch.Tensor:
    """w_t[j] from column statistics: s00[j] = sum w0^2, stt[t, j] = sum tau_t^2, s0t[t, j] = sum w0 tau_t."""
    m0 = s00.sqrt()
    mt = (s00 + 2 * s0t + stt).clamp(min=0).sqrt()
    denom = mt + m0
    # m_t - m_0 = (m_t^2 - m_0^2) / (m_t + m_0), free of the cancellation of subtracting two close norms
    dm = torch.where(denom > 0, (2 * s0t + stt) / torch.where(denom > 0, denom, 1.0), 0.0)
    # 1 - cos = (||tau||^2 - (m_t - m_0)^2) / (2 m_t m_0), the same identity; a zero column counts as cos = 0
    prod = mt * m0
    dd = torch.where(prod > 0, (stt - dm * dm).clamp(min=0) / (2 * torch.where(prod > 0, prod, 1.0)), 1.0)
    mag = rank_scores(dm.abs(), ratio, calibration)
    direction = rank_scores(dd, ratio, calibration)
    return 0.5 * (mag + direction)


class _WidenMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        if job.base_index is None:
            raise ConfigError("widen needs a base_model")
        self.job, self.experts = job, job.expert_indices
        self.ratio = float(job.params["above_average_value_ratio"])
        self.calibration = float(job.params["score_calibration_value"])
        self.vector = len(job.shape) < 2
        self.by_row = not self.vector and is_input_embedding(job.name)
        self.reduce_passes = 0 if (self.vector or not self.experts) else 1
        t, n = len(self.experts), job.row_numel
        self.columns = ColumnSums((1 + 2 * t) * n) if self.reduce_passes and not self.by_row else None
        self.row_stats: list[torch.Tensor] = []
        self.weights = None

    def _split(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        w = chunk.data[self.job.base_index]
        return w, chunk.data[self.experts] - w

    def reduce(self, p: int, chunk: Chunk) -> None:
        w, tau = self._split(chunk)
        w, tau = w.double(), tau.double()
        if self.by_row:  # one token per row: its statistics are row sums, complete inside the chunk
            self.row_stats.append(torch.cat([(w * w).sum(-1).unsqueeze(0), (tau * tau).sum(-1),
                                             (tau * w).sum(-1)], dim=0))
            return
        rows = w.shape[0]
        parts = [w * w, (tau * tau).transpose(0, 1).reshape(rows, -1), (tau * w).transpose(0, 1).reshape(rows, -1)]
        self.columns.add(chunk.row_start, torch.cat(parts, dim=1))

    def end_pass(self, p: int) -> None:
        t = len(self.experts)
        if self.by_row:
            stats = torch.cat(self.row_stats, dim=1)  # [1 + 2T, rows]
            self.row_stats = []
        else:
            stats = self.columns.total().reshape(1 + 2 * t, self.job.row_numel)
        self.weights = disentangled_weights(stats[0], stats[1:1 + t], stats[1 + t:], self.ratio,
                                            self.calibration).to(torch.float32)

    def map(self, chunk: Chunk) -> torch.Tensor:
        w, tau = self._split(chunk)
        if not self.experts:
            return w.clone()
        if self.vector:
            weights = value_scores(tau.abs().double().reshape(len(self.experts), -1), self.ratio,
                                   self.calibration).to(torch.float32).reshape(tau.shape)
        elif self.by_row:
            weights = self.weights[:, chunk.row_start:chunk.row_stop].unsqueeze(-1)
        else:
            weights = self.weights.unsqueeze(1)
        return w + stack_sum(tau * weights)


@dataclass
class WidenMethod(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _WidenMerge(job)


def methods() -> list[Method]:
    spec = MethodSpec(name="widen", params=_PARAMS, needs_base=True, min_inputs=1,
                      reference="https://arxiv.org/abs/2408.03092 (yule-BUAA/MergeLLM, widen_merging)",
                      doc=__doc__.split("\n\n")[0])
    # scratch: float64 base/task vectors and their products (~5 fp32 copies of the stack)
    return [WidenMethod(spec=spec, scratch_factor=6.0)]
