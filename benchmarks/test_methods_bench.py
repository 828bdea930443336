"""Throughput of every merge method on one large tensor (base + 3 experts), next to a memcpy of the same bytes.

Run explicitly (not part of the default test run): ``python -m pytest benchmarks/ --benchmark-only``.
Each method goes through ``pymerge.ops.merge_tensors`` exactly as a file merge would run it on one tensor.
The reported GB/s is input bytes (fp32, all tensors the method reads) per second of the best round; rounds are
few because the torch backend takes seconds to minutes per call on a 2-core machine (see ``_rounds``).
Nothing here asserts a timing. ``PYMERGE_BENCH_SIZE`` (default 4096) sets the tensor side.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional

import os

import pytest
import torch

from benchmarks.conftest import BenchFamily, record
from pymerge.ops import merge_tensors

MEMCPY_ROUNDS = 10
# The sparsifying methods take 10-100 s per call on the torch backend (2 cores), so they get one round by
# default and the suite stays within minutes; the cheap ones get three. PYMERGE_BENCH_ROUNDS overrides both.
SLOW_ROUNDS = 1
FAST_ROUNDS = 3
FAST_METHODS = {"linear", "task_arithmetic", "slerp", "model_stock"}
_ROUNDS_OVERRIDE = os.environ.get("PYMERGE_BENCH_ROUNDS")


def _rounds(method: str) -> int:
    if _ROUNDS_OVERRIDE:
        return max(1, int(_ROUNDS_OVERRIDE))
    return FAST_ROUNDS if method in FAST_METHODS else SLOW_ROUNDS


class Case(NamedTuple):
    """How one method is called: which inputs, tensor-level params, per-expert params (base gets {})."""

    inputs: str  # "base+experts", "all" (no base role) or "base+1" (base and the first expert)
    params: Dict[str, Any]
    expert_params: Dict[str, Any]


# Settings representative of real configs (mergekit examples): density 0.5 for the sparsifying methods,
# weight 1 per expert, breadcrumbs dropping the top 1% and keeping 90%, SLERP halfway.
CASES: Dict[str, Case] = {
    "linear": Case("all", {}, {"weight": 1.0}),
    "task_arithmetic": Case("base+experts", {}, {"weight": 1.0}),
    "ties": Case("base+experts", {}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": Case("base+experts", {}, {"weight": 1.0, "density": 0.5}),
    "dare_linear": Case("base+experts", {}, {"weight": 1.0, "density": 0.5}),
    "breadcrumbs": Case("base+experts", {}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "breadcrumbs_ties": Case("base+experts", {}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    "della": Case("base+experts", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    "della_linear": Case("base+experts", {}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    "slerp": Case("base+1", {"t": 0.5}, {}),
    "model_stock": Case("base+experts", {}, {}),
    "sce": Case("base+experts", {"select_topk": 0.5}, {}),
}


def _call(method: str, fam: BenchFamily):
    """(function that merges once, input bytes it reads) for ``method``."""
    case = CASES[method]
    base_index: Optional[int] = 0
    if case.inputs == "all":
        tensors: List[torch.Tensor] = fam.all
        base_index = None
        model_params = [dict(case.expert_params) for _ in tensors]
    elif case.inputs == "base+1":
        tensors = [fam.base, fam.experts[0]]
        model_params = [{}, dict(case.expert_params)]
    else:
        tensors = fam.all
        model_params = [{}] + [dict(case.expert_params) for _ in fam.experts]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)

    def run() -> torch.Tensor:
        return merge_tensors(method, tensors, base_index=base_index, params=case.params,
                             model_params=model_params, seed=0, name="model.layers.0.self_attn.q_proj.weight")

    return run, nbytes


def test_memcpy(benchmark, bench_family: BenchFamily) -> None:
    """Baseline: copy every input tensor once into preallocated buffers (Tensor.copy_), no math."""
    srcs = bench_family.all
    dsts = [torch.empty_like(t) for t in srcs]

    def run() -> None:
        for s, d in zip(srcs, dsts):
            d.copy_(s)

    benchmark.pedantic(run, rounds=MEMCPY_ROUNDS, iterations=1, warmup_rounds=2)
    record(benchmark, "memcpy", sum(t.numel() * t.element_size() for t in srcs))
    for s, d in zip(srcs, dsts):  # the copy really happened (a benchmark of a no-op would pass silently)
        assert torch.equal(s, d)


@pytest.mark.parametrize("method", list(CASES))
def test_method(benchmark, bench_family: BenchFamily, method: str) -> None:
    """One merge of the benchmark tensor with ``method``; records input GB/s of the best round."""
    run, nbytes = _call(method, bench_family)
    out = benchmark.pedantic(run, rounds=_rounds(method), iterations=1, warmup_rounds=0)
    record(benchmark, method, nbytes)
    assert out.shape == bench_family.base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all(), f"{method} produced non-finite values"
