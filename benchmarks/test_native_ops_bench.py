"""Throughput of the native CPU kernels (``pymerge.ops.native_cpu``) on one large bf16 tensor family, next to a
memcpy of the same bytes.

Run explicitly: ``python -m pytest benchmarks/test_native_ops_bench.py --benchmark-only``. The inputs are the
``bench_family`` tensors (base + 3 experts, ``PYMERGE_BENCH_SIZE``², default 4096² = 16.8M elements) stored as
bf16, as the cpu backend reads them from the memory maps; every op reads the base and the 3 experts once
(32 MiB each). ``native:memcpy`` copies those 4 tensors into preallocated buffers: the bandwidth baseline the
summary divides by. Nothing here asserts a timing.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import record
from pymerge._native import native_module

pytestmark = pytest.mark.skipif(native_module() is None, reason="pymerge._C is not built")

ROUNDS = 5
DENSITY = 0.5


@pytest.fixture(scope="module")
def bf16(bench_family):
    base = bench_family.base.to(torch.bfloat16).contiguous()
    experts = [x.to(torch.bfloat16).contiguous() for x in bench_family.experts]
    return base, experts


def _bytes(base, experts) -> int:
    return sum(t.numel() * t.element_size() for t in [base, *experts])


def _run(benchmark, name, fn, nbytes):
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record(benchmark, name, nbytes)


def test_memcpy(benchmark, bf16):
    base, experts = bf16
    outs = [torch.empty_like(t) for t in [base, *experts]]
    outs[0].fill_(0)

    def copy():
        for o, t in zip(outs, [base, *experts]):
            o.copy_(t)

    _run(benchmark, "native:memcpy", copy, _bytes(base, experts))


@pytest.mark.parametrize("op", ["count_nonfinite", "radix_hist_hi", "radix_hist_lo", "radix_hist_hi_sampled",
                                "radix_bracket", "topk_thresholds", "tie_cutoffs", "ties_map",
                                "ties_map_no_consensus", "ties_map_band", "weighted_sum", "philox_keep_mask",
                                "dare_l1_rows", "dare_map", "della_probs"])
def test_native_op(benchmark, bf16, op):
    from pymerge.ops import native_cpu as nc

    base, experts = bf16
    n = base.numel()
    ths = nc.ties_thresholds(base, experts, [DENSITY] * len(experts))
    keys = [th.key for th in ths]
    hi_bins = [k >> 16 for k in keys]
    # the bracket the sampled selection would use for these thresholds (MagnitudeTopK at its default settings)
    probe = nc.MagnitudeTopK([nc.topk_count(DENSITY, n)] * len(experts), n)
    probe.add(0, base, experts)
    probe.end(0)
    sels = sorted(probe.brackets)
    candidates = [torch.empty(probe.candidates[j].numel(), dtype=torch.int32) for j in sels]
    budgets = [nc.tie_budget(th) for th in ths]
    cutoffs, _ = nc.tie_cutoffs(base, experts, keys, budgets)
    weights = [1.0] * len(experts)
    rows = int(n ** 0.5)
    base2, experts2 = base.reshape(rows, -1), [x.reshape(rows, -1) for x in experts]
    dare = dict(seed=0, model_ids=[1, 2, 3], tensor_name="bench", probs=[DENSITY] * 3)
    fns = {
        "count_nonfinite": lambda: nc.count_nonfinite([base, *experts]),
        "radix_hist_hi": lambda: nc.radix_hist_hi(experts, base=base),
        "radix_hist_lo": lambda: nc.radix_hist_lo(experts, hi_bins, base=base),
        # the sampled selection's passes: its hi histogram of a sample, its bracket pass, and all of it together
        "radix_hist_hi_sampled": lambda: nc.radix_hist_hi(experts, base=base, sample_shift=probe.shift),
        "radix_bracket": lambda: nc.radix_bracket([experts[j] for j in sels], [probe.brackets[j][0] for j in sels],
                                                  [probe.brackets[j][1] for j in sels], candidates, [0] * len(sels),
                                                  base=base),
        "topk_thresholds": lambda: nc.ties_thresholds(base, experts, [DENSITY] * len(experts)),
        "tie_cutoffs": lambda: nc.tie_cutoffs(base, experts, keys, budgets),
        "ties_map": lambda: nc.ties_map(base, experts, weights, keys, cutoffs),
        "ties_map_no_consensus": lambda: nc.ties_map(base, experts, weights, [-1] * 3, [n] * 3, consensus=False,
                                                     normalize=False),
        "weighted_sum": lambda: nc.weighted_sum([base, *experts], [0.25] * 4),
        # one keep mask per expert, as dare_ties draws them (reads nothing: compare its time, not its GB/s)
        "philox_keep_mask": lambda: [nc.philox_keep_mask(0, j, "bench", 0, n, DENSITY) for j in range(3)],
        # breadcrumbs' band: the same thresholds as outer and inner (every tie cutoff placed), to time the band
        "ties_map_band": lambda: nc.ties_map(base, experts, weights, keys, cutoffs, inner_keys=keys,
                                             inner_cutoffs=cutoffs, normalize=False),
        # DARE rescale pass (masks drawn inside) and the fused DARE map; DELLA's ranks of one expert
        "dare_l1_rows": lambda: nc.dare_l1_rows(base2, experts2, **dare),
        "dare_map": lambda: nc.dare_map(base, experts, weights, scales=[1.5] * 3, **dare),
        "della_probs": lambda: nc.della_probs(base2, experts2[0], DENSITY, 0.1),
    }
    _run(benchmark, f"native:{op}", fns[op], _bytes(base, experts))
