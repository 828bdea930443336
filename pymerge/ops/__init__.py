"""Tensor-level public ops: merge in-memory tensors with any method, and the primitives methods are built of.

    >>> from pymerge import ops
    >>> merged = ops.merge_tensors("ties", [base, a, b], base_index=0,
    ...                            model_params=[{}, {"weight": 1, "density": 0.3}, {"weight": 1, "density": 0.3}])

Results are fp32 (math is fp32 whatever the input dtype); cast them yourself. ``max_rows_per_chunk`` runs the
same passes the file executor runs on a tensor too large for its memory budget (useful to check that a method
does not depend on chunking).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ConfigError
from .consensus import sign_consensus
from .philox import keep_mask, name_hash, philox4x32_10, random_words
from .threads import threads_for
from .select import TieCursor, TopKSelector, magnitude_keys, topk_mask


def merge_tensors(method: str, tensors: Sequence[torch.Tensor], *, base_index: int | None = None,
                  params: dict[str, Any] | None = None, model_params: Sequence[dict[str, Any]] | None = None,
                  seed: int = 0, name: str = "tensor", model_ids: Sequence[int] | None = None,
                  max_rows_per_chunk: int | None = None) -> torch.Tensor:
    """theta = method(tensors) for one tensor, as the file merge computes it (fp32 result).

    ``params``: tensor-level parameters (lambda, normalize, t, ...); ``model_params``: per-input parameters
    (weight, density, ...), aligned with ``tensors``; defaults and required parameters as in the config.
    ``name`` and ``model_ids`` key the random masks (Philox), like the tensor name and model position in a file
    merge.
    """
    from ..methods import Chunk, TensorJob, get_method  # methods are built on ops: import at call time

    m = get_method(method)
    n = len(tensors)
    if n == 0:
        raise ConfigError(f"{method}: no input tensors")
    shape = tuple(tensors[0].shape)
    for i, t in enumerate(tensors):
        if tuple(t.shape) != shape:
            raise ConfigError(f"{method}: input {i} has shape {list(t.shape)}, expected {list(shape)}")
    params = dict(params or {})
    model_params = [dict(p) for p in (model_params or [{} for _ in tensors])]
    if len(model_params) != n:
        raise ConfigError(f"{method}: model_params has {len(model_params)} entries for {n} tensors")
    if m.spec.needs_base and base_index is None:
        raise ConfigError(f"{method} needs base_index")
    known = {p.name for p in m.spec.params}
    for key in list(params) + [k for p in model_params for k in p]:
        if key not in known:
            raise ConfigError(f"{method}: unknown parameter '{key}' (known: {', '.join(sorted(known))})")
    for spec in m.spec.params:
        if spec.per_model:
            for i, p in enumerate(model_params):
                if m.spec.needs_base and i == base_index:
                    continue
                if p.get(spec.name) is None:
                    if spec.required:
                        raise ConfigError(f"{method}: parameter '{spec.name}' is required for input {i}")
                    p[spec.name] = spec.default
                p[spec.name] = spec.coerce(p[spec.name], f"input {i}")
        else:
            if params.get(spec.name) is None:
                if spec.required:
                    raise ConfigError(f"{method}: parameter '{spec.name}' is required")
                params[spec.name] = spec.default
            params[spec.name] = spec.coerce(params[spec.name], method)
    job = TensorJob(name=name, shape=shape, inputs=[f"input{i}" for i in range(n)], base_index=base_index,
                    params=params, model_params=model_params,
                    model_ids=list(model_ids) if model_ids is not None else list(range(n)), seed=seed)
    if job.numel == 0:
        return torch.empty(shape, dtype=torch.float32)
    data = torch.stack([t.detach().to("cpu", torch.float32).reshape(job.rows, job.row_numel) for t in tensors])
    step = job.rows if max_rows_per_chunk is None else max(1, int(max_rows_per_chunk))
    chunks = [Chunk(a, min(a + step, job.rows), data[:, a:a + step]) for a in range(0, job.rows, step)]
    if m.global_passes(params):
        state = m.global_init([job])
        for p in range(m.global_passes(params)):
            for c in chunks:
                m.global_reduce(state, p, job, c)
            job.global_state = m.global_end_pass(state, p)
    with threads_for(job.numel * n):
        merge = m.start(job)
        for p in range(merge.reduce_passes):
            for c in chunks:
                merge.reduce(p, c)
            merge.end_pass(p)
        out = torch.cat([merge.map(c) for c in chunks], dim=0) if chunks else data[0]
    return out.reshape(shape)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i (or without the division when ``normalize=False``)."""
    return merge_tensors("linear", tensors, params={"normalize": normalize},
                         model_params=[{"weight": w} for w in weights])


def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], *,
                    lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    """base + lambda * sum_t w_t (x_t - base) (divided by sum_t w_t when ``normalize``)."""
    return merge_tensors("task_arithmetic", [base, *experts], base_index=0,
                         params={"lambda": lambda_, "normalize": normalize},
                         model_params=[{}] + [{"weight": w} for w in weights])


def ties(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float],
         densities: Sequence[float], *, lambda_: float = 1.0, normalize: bool = True, rescale: bool = False,
         consensus_method: str = "sum") -> torch.Tensor:
    """TIES (mergekit semantics): trim each task vector to its top density, elect signs, disjoint mean."""
    return merge_tensors("ties", [base, *experts], base_index=0,
                         params={"lambda": lambda_, "normalize": normalize, "rescale": rescale,
                                 "consensus_method": consensus_method},
                         model_params=[{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)])


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1), mergekit's per-tensor SLERP."""
    return merge_tensors("slerp", [a, b], base_index=0, params={"t": t})


__all__ = ["merge_tensors", "linear", "task_arithmetic", "ties", "slerp", "sign_consensus", "topk_mask",
           "magnitude_keys", "TopKSelector", "TieCursor", "keep_mask", "random_words", "philox4x32_10",
           "name_hash"]
