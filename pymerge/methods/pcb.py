"""PCB-Merging (Parameter Competition Balancing, Du et al., NeurIPS 2024), data-free form.

Per task t over its D elements (the whole model with ``pcb_scope: global``, one tensor with ``tensor``):

    a_t     = clip(|tau_t|, q_t(c), q_t(1-c))          q_t(f) = sorted(|tau_t|)[int(D f)], upper: [int(D(1-c) - 1)]
    tauc_t  = sgn(tau_t) a_t
    n_t     = Norm(a_t) = (a_t - min a_t) / (max a_t - min a_t)
    intra_t = exp(T n_t^2)                              T = number of task vectors
    inter_t = tanh(tau_t * sum_j tau_j)                 (pcb_inter: sum; the reference file pcb-merging.py)
    beta_t  = intra_t * inter_t
    scale_t = Norm(clip(beta_t, sorted(beta_t)[int(D (1 - r))], max beta_t))     r = pcb_ratio (kept fraction)
    tau_m   = sum_t scale_t w_t tauc_t / max(sum_t scale_t, 1e-12)
    theta   = theta_0 + lambda tau_m

Reference: duguodong7/pcb-merging, ``pcb-merging.py::PCB_merge`` (its NLP twin ``task_para_att_merge`` is the
same with clip ratio 0.01). ``pcb_inter`` offers the vision variants: ``normalized`` (``vision_source_code/pcb.py``:
tanh(tau_t * sum_j s_j), s_j = sgn(tau_j) n_j) and ``pairwise`` (``pcb_ES.py``: sum_j tanh(s_t s_j)). The per-model
``weight`` is the ES variant's lambda_t inside the weighted mean (1 = the plain method).

Engine plan: four reduce passes, then the map. Passes 0-1 find the clip quantiles exactly (radix select on
|tau| bits), passes 2-3 the quantile and maximum of beta (radix select on signed keys), all per task.

Deliberate differences, each documented in docs/methods/research.md:
- intra is computed as exp(T (n^2 - 1)): the factor e^-T cancels in scale's min-max normalisation, and the
  shifted form cannot overflow fp32 whatever the number of tasks.
- Norm of a constant (max == min) is 0 instead of NaN; a task whose beta quantile equals its maximum keeps
  nothing (scale 0) instead of NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..ops.consensus import stack_sum
from ..ops.order_stat import OrderStatistics
from ..ops.threads import threads_for
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge

_INTER = ("sum", "normalized", "pairwise")
_SCOPES = ("global", "tensor")

_PARAMS = (
    ParamSpec("weight", float, default=1.0, per_model=True,
              doc="lambda_t of the task inside the weighted mean (PCB-ES); 1 is the plain method"),
    ParamSpec("lambda", float, default=1.0, doc="scale of the merged task vector"),
    ParamSpec("pcb_ratio", float, default=0.1, doc="fraction of each task's elements kept (by balanced score)"),
    ParamSpec("clip_ratio", float, default=0.0001,
              doc="fraction of |tau| clipped at each end before balancing (0.01 in the NLP/vision code)"),
    ParamSpec("pcb_inter", str, default="sum",
              doc="inter-balancing: 'sum' (pcb-merging.py), 'normalized' (vision pcb.py), 'pairwise' (pcb_ES.py)"),
    ParamSpec("pcb_scope", str, default="global",
              doc="'global': statistics over the whole model (reference); 'tensor': per tensor"),
)


def _setting(params: dict, where: str) -> tuple[float, float, str, str]:
    r, c = float(params["pcb_ratio"]), float(params["clip_ratio"])
    inter, scope = str(params["pcb_inter"]), str(params["pcb_scope"])
    if not 0 < r <= 1:
        raise ConfigError(f"{where}: pcb_ratio must be in (0, 1] (the kept fraction), got {r}")
    if not 0 <= c < 0.5:
        raise ConfigError(f"{where}: clip_ratio must be in [0, 0.5), got {c}")
    if inter not in _INTER:
        raise ConfigError(f"{where}: pcb_inter must be one of {', '.join(_INTER)}, got {inter!r}")
    if scope not in _SCOPES:
        raise ConfigError(f"{where}: pcb_scope must be 'global' or 'tensor', got {scope!r}")
    return r, c, inter, scope


def _norm(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x - lo) / (hi - lo) per task (dim 0), 0 where hi == lo (the reference divides by zero there)."""
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)


class PCBStats:
    """Per-task PCB statistics over D elements, accumulated over chunks of task vectors ``tau[T, ...]``.

    Passes 0-1: clip quantiles of |tau_t| (``lo``/``hi``); passes 2-3: the beta quantile ``q`` and max ``top``.
    """

    passes = 4

    def __init__(self, n: int, tasks: int, pcb_ratio: float, clip_ratio: float, inter: str):
        self.n, self.tasks, self.inter = n, tasks, inter
        # the reference's indices, with its float expressions (clamp(x, min_ratio, max_ratio) on sorted x)
        lo_i, hi_i = int(n * clip_ratio), int(n * (1 - clip_ratio) - 1)
        hi_i = min(max(hi_i, lo_i), n - 1)
        self.clip_sel = OrderStatistics(n, [[lo_i, hi_i]] * tasks, signed=False)
        q_i = min(int(n * (1 - pcb_ratio)), n - 1)
        self.beta_sel = OrderStatistics(n, [[q_i, n - 1]] * tasks, signed=True)
        self.lo = self.hi = self.q = self.top = None

    def reduce(self, p: int, tau: torch.Tensor) -> None:
        flat = tau.reshape(self.tasks, -1)
        if p < 2:
            self.clip_sel.add(p, flat)
        else:
            self.beta_sel.add(p - 2, self.balance(tau)[0].reshape(self.tasks, -1))

    def end_pass(self, p: int) -> None:
        if p < 2:
            self.clip_sel.end(p)
            if p == 1:
                v = self.clip_sel.values
                self.lo = torch.tensor([r[0] for r in v], dtype=torch.float32)
                self.hi = torch.tensor([r[1] for r in v], dtype=torch.float32)
        else:
            self.beta_sel.end(p - 2)
            if p == 3:
                v = self.beta_sel.values
                self.q = torch.tensor([r[0] for r in v], dtype=torch.float32)
                self.top = torch.tensor([r[1] for r in v], dtype=torch.float32)

    def balance(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(beta, clipped tau) for a chunk of task vectors ``tau[T, ...]`` (elementwise given the clip quantiles)."""
        shape = (self.tasks,) + (1,) * (tau.dim() - 1)
        lo, hi = self.lo.reshape(shape), self.hi.reshape(shape)
        a = torch.minimum(torch.maximum(tau.abs(), lo), hi)
        sign = torch.sign(tau)
        normed = _norm(a, lo, hi)
        beta = torch.exp(float(self.tasks) * (normed * normed - 1.0))
        if self.inter == "sum":
            inter = torch.tanh(tau * stack_sum(tau))
        else:
            s = sign * normed
            if self.inter == "normalized":
                inter = torch.tanh(tau * stack_sum(s))
            else:  # pairwise: sum_j tanh(s_t s_j), accumulated in j order
                inter = torch.tanh(s * s[0])
                for j in range(1, self.tasks):
                    inter += torch.tanh(s * s[j])
        beta *= inter
        return beta, sign * a

    def scale(self, beta: torch.Tensor) -> torch.Tensor:
        """Norm(clip(beta, q, max)): 0 at or below the quantile, (0, 1] above it."""
        shape = (self.tasks,) + (1,) * (beta.dim() - 1)
        q, top = self.q.reshape(shape), self.top.reshape(shape)
        return _norm(torch.maximum(beta, q), q, top)


class _PCBMerge(TensorMerge):
    def __init__(self, method: "PCBMethod", job: TensorJob):
        if job.base_index is None:
            raise ConfigError("pcb needs a base_model")
        self.job = job
        self.experts = job.expert_indices
        r, c, inter, scope = _setting(job.params, f"tensor '{job.name}'")
        self.lam = float(job.params["lambda"])
        self.weights = torch.tensor([float(job.model_params[i]["weight"]) for i in self.experts],
                                    dtype=torch.float32)
        if not self.experts:
            self.stats = None
        elif scope == "global":
            self.stats = job.global_state
            if not isinstance(self.stats, PCBStats):
                raise ConfigError(f"tensor '{job.name}': pcb_scope: global needs the whole-model passes "
                                  "(set pcb_scope once for the whole merge)")
        else:
            self.stats = PCBStats(job.numel, len(self.experts), r, c, inter)
            self.reduce_passes = PCBStats.passes

    def _tau(self, chunk: Chunk) -> torch.Tensor:
        return chunk.data[self.experts] - chunk.data[self.job.base_index]

    def reduce(self, p: int, chunk: Chunk) -> None:
        self.stats.reduce(p, self._tau(chunk))

    def end_pass(self, p: int) -> None:
        self.stats.end_pass(p)

    def map(self, chunk: Chunk) -> torch.Tensor:
        base = chunk.data[self.job.base_index]
        if not self.experts:
            return base.clone()
        beta, tauc = self.stats.balance(self._tau(chunk))
        scale = self.stats.scale(beta)
        tauc *= self.weights.reshape(-1, 1, 1)
        merged = stack_sum(tauc * scale) / torch.clamp(stack_sum(scale), min=1e-12)
        if self.lam != 1:
            merged *= self.lam
        return base + merged


@dataclass
class PCBMethod(Method):
    def start(self, job: TensorJob) -> TensorMerge:
        return _PCBMerge(self, job)

    def global_passes(self, params: dict) -> int:
        return PCBStats.passes if params.get("pcb_scope", "global") == "global" else 0

    def global_init(self, jobs: list[TensorJob]) -> PCBStats:
        first = jobs[0]
        setting = _setting(first.params, "pcb")
        for j in jobs:
            if _setting(j.params, f"tensor '{j.name}'") != setting or j.expert_indices != first.expert_indices:
                raise ConfigError(f"pcb with pcb_scope: global needs one pcb_ratio/clip_ratio/pcb_inter and the same "
                                  f"models for every tensor; tensor '{j.name}' differs from '{first.name}'")
        r, c, inter, _ = setting
        total = sum(j.numel for j in jobs)
        state = PCBStats(max(total, 1), len(first.expert_indices), r, c, inter)
        state.experts, state.base = first.expert_indices, first.base_index
        return state

    def global_reduce(self, state: PCBStats, p: int, job: TensorJob, chunk: Chunk) -> None:
        if state.experts:
            # the executor's global passes do not pick a thread count per tensor; a small chunk on several
            # threads is dominated by parallel-region overhead (see ops/threads.py)
            with threads_for(chunk.data.numel()):
                state.reduce(p, chunk.data[state.experts] - chunk.data[state.base])

    def global_end_pass(self, state: PCBStats, p: int) -> PCBStats | None:
        if state.experts:
            with threads_for(0):
                state.end_pass(p)
        return state if p == PCBStats.passes - 1 else None


def methods() -> list[Method]:
    spec = MethodSpec(name="pcb", params=_PARAMS, needs_base=True, min_inputs=1,
                      reference="https://arxiv.org/abs/2410.02396 (duguodong7/pcb-merging, pcb-merging.py)",
                      doc=__doc__.split("\n\n")[0])
    # scratch: tau, |tau| clip, normed, beta, inter, scale, weighted copy ~ 6 fp32 copies of the expert stack
    return [PCBMethod(spec=spec, scratch_factor=6.0)]
