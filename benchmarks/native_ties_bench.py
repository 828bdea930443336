"""Native CPU TIES (pymerge.ops.native_cpu.ties_tensor) against the torch backend on one large bf16 tensor.

    python -m benchmarks.native_ties_bench [--numel 16777216] [--experts 3] [--density 0.5] [--rounds 3]
                                           [--torch-rounds 1] [--skip-torch]

Prints seconds (best of the rounds) and GB/s = bytes moved / seconds, for: a memcpy of the inputs (the floor),
the native thresholds (two histogram passes, each reading base + experts), the tie-cutoff scan (GB/s as if it
read everything; it stops at the last cutoff), the native map, the whole native TIES, and the torch backend
(``pymerge.ops.merge_tensors("ties")`` plus the cast to bf16). For the map and the whole merges the bytes are
base + experts read once and the output written once.
Checks that both give the same bits, and asserts nothing about speed. Data: a base ~ N(0, 0.02) and experts =
base + N(0, 0.01) task vectors, all bf16, weight 1 and the same density for every expert.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch


def best_seconds(fn: Callable[[], object], rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-rounds", type=int, default=1)
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    from pymerge._native import build_info
    from pymerge.ops import merge_tensors, native_cpu

    g = torch.Generator().manual_seed(0)
    n, k = args.numel, args.experts
    base32 = torch.randn(n, generator=g) * 0.02
    base = base32.to(torch.bfloat16)
    experts = [(base32 + torch.randn(n, generator=g) * 0.01).to(torch.bfloat16) for _ in range(k)]
    del base32
    weights, densities = [1.0] * k, [args.density] * k
    io_bytes = (k + 2) * n * base.element_size()  # inputs read once, output written once

    info = build_info()
    print(f"pymerge native TIES benchmark: {n:,} elements x {k} experts, bf16, density {args.density}; "
          f"OpenMP threads {info.get('omp_max_threads')}, torch threads {torch.get_num_threads()}")
    print(f"{'what':<34}{'seconds':>10}{'GB/s':>9}")

    def row(name: str, seconds: float, nbytes: int = io_bytes) -> None:
        print(f"{name:<34}{seconds:>10.4f}{nbytes / seconds / 1e9:>9.2f}")

    copies = [torch.empty_like(x) for x in [base, *experts]]
    row("memcpy of the inputs (floor)",
        best_seconds(lambda: [c.copy_(x) for c, x in zip(copies, [base, *experts])], args.rounds),
        (k + 1) * n * base.element_size())
    del copies

    ths = native_cpu.ties_thresholds(base, experts, densities)
    keys, budgets = [th.key for th in ths], [native_cpu.tie_budget(th) for th in ths]
    cutoffs, _ = native_cpu.tie_cutoffs(base, experts, keys, budgets)
    print(f"thresholds: keys {keys}, tie budgets {budgets} (-1: every tie kept), tie cutoffs {cutoffs}")
    row("native thresholds (2 hist passes)",
        best_seconds(lambda: native_cpu.ties_thresholds(base, experts, densities), args.rounds),
        2 * (k + 1) * n * base.element_size())
    row("native tie cutoffs (partial scan)",
        best_seconds(lambda: native_cpu.tie_cutoffs(base, experts, keys, budgets), args.rounds),
        (k + 1) * n * base.element_size())
    row("native map", best_seconds(lambda: native_cpu.ties_map(base, experts, weights, keys, cutoffs),
                                   args.rounds))
    native_s = best_seconds(lambda: native_cpu.ties_tensor(base, experts, weights, densities), args.rounds)
    row("native TIES (thresholds + map)", native_s)
    if args.skip_torch:
        return

    def torch_ties() -> torch.Tensor:
        out = merge_tensors("ties", [base, *experts], base_index=0,
                            model_params=[{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)])
        return out.to(torch.bfloat16)

    torch_s = best_seconds(torch_ties, args.torch_rounds)
    row("torch backend TIES", torch_s)
    same = torch.equal(torch_ties().view(torch.int16),
                       native_cpu.ties_tensor(base, experts, weights, densities).view(torch.int16))
    print(f"speed-up native / torch: {torch_s / native_s:.1f}x; identical bits: {same}")


if __name__ == "__main__":
    main()
