"""LiNeS (Wang et al., ICLR 2025): scale the merged task vector linearly with layer depth.

    tau_m   = sum_t w_t (theta_t - theta_0)                          (task arithmetic, the reference's "sum")
    s(name) = alpha + beta * l / (L - 1)     for a tensor of layer l (``model.layers.l.``, ``h.l.``, ``blocks.l.``...)
            = alpha                          for tensors outside the layers (embeddings, final norm, lm_head)
    theta   = theta_0 + s(name) * tau_m
    alpha   = (||sum_t tau_t||_1 / ||tau_m||_1) / T   when not given (the reference's multi-task rule, whole model)

Single-task editing (the reference's ``single_task``) is one model with ``alpha: lambda, beta: 1 - lambda``.
L is ``num_layers`` when given, else one more than the largest layer index among the merged tensors' names.

Reference: wang-kee/LiNeS, ``src/eval/eval.py::LiNeS_scaling`` and ``evaluate`` (alpha rule), ``aggregation.py``
(the L1 norms). Deliberate difference: the reference finds a tensor's block by the first substring ``.{i}.`` of
the name (so ``mlp.0.`` inside block 7 could read as block 0); here the index is parsed from the layer
component of the name. With L = 1 the depth fraction is 0 (the reference divides by zero).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..ops.consensus import stack_sum
from ..ops.exact_sum import ExactSum, row_sums
from ..ops.threads import threads_for
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge

# a layer component followed by its index: model.layers.3., transformer.h.3., blocks.3., encoder.layer.3., ...
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|resblocks)\.(\d+)\.")

_PARAMS = (
    ParamSpec("weight", float, default=1.0, per_model=True, doc="weight of the model's task vector in the sum"),
    ParamSpec("beta", float, required=True, doc="scale added across depth: the last layer gets alpha + beta"),
    ParamSpec("alpha", float, default=None,
              doc="scale of the first layer and of non-layer tensors; default: ||sum tau||_1 / ||tau_m||_1 / T"),
    ParamSpec("num_layers", int, default=0, doc="layer count L; 0: from the tensor names"),
)


def layer_index(name: str) -> int | None:
    """The layer a tensor belongs to, from the first ``<layers|layer|h|blocks|block|resblocks>.<i>.`` component."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def depth_scale(name: str, alpha: float, beta: float, num_layers: int) -> float:
    """alpha + beta * l / (L - 1) for a tensor of layer l, alpha outside the layers (and when L == 1)."""
    layer = layer_index(name)
    if layer is None:
        return alpha
    if layer >= num_layers:
        raise ConfigError(f"lines: tensor '{name}' is in layer {layer} but num_layers is {num_layers}")
    return alpha + (beta * layer / (num_layers - 1) if num_layers > 1 else 0.0)


@dataclass
class _LinesState:
    alpha: float | None
    num_layers: int
    experts: list[int]
    base: int
    norms: ExactSum  # [||sum_t tau_t||_1, ||sum_t w_t tau_t||_1]


def _weights(job: TensorJob) -> torch.Tensor:
    return torch.tensor([float(job.model_params[i]["weight"]) for i in job.expert_indices],
                        dtype=torch.float32).reshape(-1, 1, 1)


class _LinesMerge(TensorMerge):
    def __init__(self, job: TensorJob):
        if job.base_index is None:
            raise ConfigError("lines needs a base_model")
        self.job = job
        state = job.global_state
        alpha = job.params["alpha"] if state is None or state.alpha is None else state.alpha
        layers = int(job.params["num_layers"]) or (state.num_layers if state is not None else 0)
        self.scale = depth_scale(job.name, float(alpha), float(job.params["beta"]), layers)

    def map(self, chunk: Chunk) -> torch.Tensor:
        data, experts = chunk.data, self.job.expert_indices
        base = data[self.job.base_index]
        if not experts:
            return base.clone()
        merged = stack_sum((data[experts] - base) * _weights(self.job))
        return base + self.scale * merged


@dataclass
class LinesMethod(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _LinesMerge(job)

    def global_passes(self, params: dict) -> int:
        # one pass for the L1 norms of the automatic alpha; with alpha given there is nothing to read (the layer
        # count, when not given, comes from the tensor names in global_init)
        return 0 if params.get("alpha") is not None else 1

    def global_state_without_passes(self, params: dict) -> bool:
        return params.get("alpha") is not None and int(params.get("num_layers") or 0) <= 0

    def global_init(self, jobs: list[TensorJob]) -> _LinesState:
        first = jobs[0]
        layers = int(first.params["num_layers"] or 0)
        if layers <= 0:
            found = [i for i in (layer_index(j.name) for j in jobs) if i is not None]
            layers = max(found) + 1 if found else 0
        alpha = first.params["alpha"]
        if alpha is None and any(j.params["alpha"] is not None for j in jobs):
            raise ConfigError("lines: alpha must be given for every tensor or for none (the automatic alpha is one "
                              "number for the whole model)")
        return _LinesState(alpha=None if alpha is None else float(alpha), num_layers=layers,
                           experts=first.expert_indices, base=first.base_index, norms=ExactSum(2))

    def global_reduce(self, state: _LinesState, p: int, job: TensorJob, chunk: Chunk) -> None:
        if state.alpha is not None or not state.experts:
            return
        with threads_for(chunk.data.numel()):  # the executor's global passes pick no thread count
            tau = chunk.data[state.experts] - chunk.data[state.base]
            plain = stack_sum(tau).abs()
            weighted = stack_sum(tau * _weights(job)).abs()
            state.norms.add_rows(torch.stack([row_sums(plain), row_sums(weighted)], dim=1))

    def global_end_pass(self, state: _LinesState, p: int) -> _LinesState:
        if state.alpha is None:
            plain, weighted = state.norms.values()
            t = max(len(state.experts), 1)
            state.alpha = plain / weighted / t if weighted > 0 else 0.0  # tau_m == 0: the scale is moot
        return state


def methods() -> list[Method]:
    spec = MethodSpec(name="lines", params=_PARAMS, needs_base=True, min_inputs=1,
                      reference="https://arxiv.org/abs/2410.17146 (wang-kee/LiNeS, src/eval/eval.py)",
                      doc=__doc__.split("\n\n")[0])
    return [LinesMethod(spec=spec, scratch_factor=2.0)]
