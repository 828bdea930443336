"""Fixtures for the method benchmarks: one large Llama-like tensor family, and a GB/s summary table.

This directory is outside the project's ``testpaths`` (``tests/``), so a plain ``pytest`` never collects it;
run it explicitly: ``python -m pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest
import torch

pytest.importorskip("pytest_benchmark")

# Side of the square benchmark tensor; 4096 is a 7B-class attention projection (64 MiB in fp32).
BENCH_SIZE = int(os.environ.get("PYMERGE_BENCH_SIZE", "4096"))
N_EXPERTS = 3
_INIT_STD = 0.02  # Llama's initializer_range
_DELTA = 0.01  # task-vector scale, as in pymerge.synth


@dataclass
class BenchFamily:
    """A base tensor and its experts, fp32 values that are exactly representable in bf16 (as loaded weights)."""

    base: torch.Tensor
    experts: List[torch.Tensor]

    @property
    def all(self) -> List[torch.Tensor]:
        return [self.base, *self.experts]


@dataclass
class BenchRow:
    """One measured benchmark for the summary: best round time and the input bytes it consumed."""

    name: str
    input_bytes: int
    min_s: float

    @property
    def gb_per_s(self) -> float:
        return self.input_bytes / self.min_s / 1e9


# Filled by the tests as they run; printed by pytest_terminal_summary. Keyed by test name.
RESULTS: Dict[str, BenchRow] = {}


def _bf16_values(x: torch.Tensor) -> torch.Tensor:
    # Merges read bf16 checkpoints and widen them to fp32; rounding through bf16 gives the same value set
    # (and the same tie structure in top-k selections) as real weights.
    return x.to(torch.bfloat16).to(torch.float32)


@pytest.fixture(scope="session")
def bench_family() -> BenchFamily:
    """Base ~ N(0, 0.02²) and experts = base + shared + independent + sparse task vectors (like pymerge.synth)."""
    g = torch.Generator().manual_seed(1234)
    shape = (BENCH_SIZE, BENCH_SIZE)
    base = torch.randn(shape, generator=g) * _INIT_STD
    shared = torch.randn(shape, generator=g) * (_DELTA / 4)
    experts = []
    for _ in range(N_EXPERTS):
        tau = shared + torch.randn(shape, generator=g) * (_DELTA / 4)
        sparse = torch.rand(shape, generator=g) < 0.02
        tau += sparse * torch.randn(shape, generator=g) * _DELTA
        experts.append(_bf16_values(base + tau))
    return BenchFamily(_bf16_values(base), experts)


def record(benchmark, name: str, input_bytes: int) -> Optional[BenchRow]:
    """Store the finished benchmark's best time and GB/s in extra_info and in the summary (None when disabled)."""
    meta = benchmark.stats  # None under --benchmark-disable: the function ran once, untimed
    if meta is None:
        return None
    row = BenchRow(name, input_bytes, meta.stats.min)
    RESULTS[name] = row
    benchmark.extra_info["input_bytes"] = input_bytes
    benchmark.extra_info["gb_per_s"] = round(row.gb_per_s, 3)
    base = RESULTS.get(_baseline_of(name))
    if base is not None and name != base.name:
        benchmark.extra_info["x_memcpy_gbps"] = round(row.gb_per_s / base.gb_per_s, 4)
    return row


def _baseline_of(name: str) -> str:
    """The memcpy row a benchmark is compared with: the native kernels' bf16 one, or the methods' fp32 one."""
    return "native:memcpy" if name.startswith("native:") else "memcpy"


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the GB/s table: every method next to the memcpy of the same input bytes, all from this run."""
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section(f"pymerge throughput ({BENCH_SIZE}x{BENCH_SIZE}; methods: fp32 inputs, native: bf16; best round)")
    tr.write_line(f"{'benchmark':<28} {'input MB':>9} {'best s':>9} {'GB/s':>8} {'x memcpy time':>14}")
    for row in RESULTS.values():
        base = RESULTS.get(_baseline_of(row.name))
        ratio = f"{row.min_s / (base.min_s * row.input_bytes / base.input_bytes):.1f}x" if base else "-"
        tr.write_line(f"{row.name:<28} {row.input_bytes / 1e6:>9.1f} {row.min_s:>9.4f} {row.gb_per_s:>8.3f} "
                      f"{ratio:>14}")
    tr.write_line("x memcpy time: method time / memcpy time scaled to the same input bytes "
                  "(how many times slower than copying the inputs once).")
