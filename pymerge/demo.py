"""``pymerge demo``: the main job on a built-in default, end to end, with its speed against the read floor.

Generates (once, cached) a Llama-shaped bf16 base + 3 experts, times reading every input byte once (the
floor), runs a TIES merge, verifies the output (layout, finiteness, and sample tensors recomputed by an
independent float64 TIES), and prints tensors, bytes, seconds, GB/s and the ratio to the floor.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import torch

from .api import merge
from .errors import MergeError
from .io.checkpoint import Checkpoint
from .synth import PRESETS, make_family

DEMO_WEIGHTS = (1.0, 0.8, 0.6)
DEMO_DENSITY = 0.5
# tensors recomputed in float64 by the verifier: enough to catch a wrong method, cheap enough for the demo
VERIFY_TENSORS = 3
# share of elements allowed to differ from the float64 reference (exact-cancellation sign elections; measured:
# 1 element of 196,608 in the demo's first k_proj)
ELECTION_TIE_SHARE = 1e-4


def default_cache_dir() -> Path:
    root = os.environ.get("PYMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pymerge")
    return Path(root) / "demo"


def read_floor_seconds(paths: list[Path]) -> tuple[float, int]:
    """Seconds to copy every tensor of every checkpoint once out of its memory map, and the bytes read."""
    cks = [Checkpoint.open(p) for p in paths]
    try:
        biggest = max(ck.info(n).nbytes for ck in cks for n in ck.names())
        buf = torch.empty(biggest, dtype=torch.uint8)
        total = 0
        t0 = time.perf_counter()
        for ck in cks:
            for n in ck.names():
                v = ck.tensor(n).reshape(-1).view(torch.uint8)
                buf[: v.numel()].copy_(v)
                total += v.numel()
        return time.perf_counter() - t0, total
    finally:
        for ck in cks:
            ck.close()


def _ties_float64(base: torch.Tensor, experts: list[torch.Tensor], weights, density: float) -> torch.Tensor:
    """Independent float64 TIES (mergekit semantics): exact top-k by a stable sort, weighted sum election."""
    b = base.double().reshape(-1)
    deltas = []
    for x, w in zip(experts, weights):
        tau = x.double().reshape(-1) - b
        k = max(1, int(density * tau.numel()))
        keep = torch.zeros_like(tau, dtype=torch.bool)
        keep[torch.sort(tau.abs(), descending=True, stable=True).indices[:k]] = True
        deltas.append(tau * keep * w)
    d = torch.stack(deltas)
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1)
    agree = torch.sign(d) == torch.where(d.sum(0) >= 0, 1.0, -1.0)
    div = (w * agree).sum(0)
    div[div == 0] = 1
    return (b + (d * agree).sum(0) / div).reshape(base.shape)


def verify_output(out_dir: Path, base: Path, experts: list[Path]) -> int:
    """Check the merged checkpoint against its inputs; returns the number of tensors checked."""
    out = Checkpoint.open(out_dir)
    ins = [Checkpoint.open(p) for p in [base, *experts]]
    try:
        names = out.names()
        if sorted(names) != sorted(ins[0].names()):
            raise MergeError(f"demo: output {out_dir} has a different tensor set than the base")
        for n in names:
            o, b = out.info(n), ins[0].info(n)
            if tuple(o.shape) != tuple(b.shape) or o.dtype != b.dtype:
                raise MergeError(f"demo: tensor '{n}' is {o.dtype}{list(o.shape)}, expected {b.dtype}{list(b.shape)}")
            if not torch.isfinite(out.tensor(n).float()).all():
                raise MergeError(f"demo: tensor '{n}' has non-finite values")
        # recompute the smallest 2-D tensors independently (bf16 output: compare at bf16 resolution)
        sample = sorted((n for n in names if len(out.info(n).shape) == 2), key=lambda n: out.info(n).numel)
        for n in sample[:VERIFY_TENSORS]:
            ref = _ties_float64(ins[0].tensor(n), [ck.tensor(n) for ck in ins[1:]], DEMO_WEIGHTS, DEMO_DENSITY)
            got = out.tensor(n).double()
            # bf16 inputs sit on a coarse grid, so weighted deltas can cancel exactly in float64 but not in fp32,
            # flipping the elected sign of an element; allow such election ties on a tiny share of elements
            bad = int((~torch.isclose(got, ref, rtol=2**-7, atol=1e-6)).sum())
            if bad > max(1, got.numel() * ELECTION_TIE_SHARE):
                worst = float((got - ref).abs().max())
                raise MergeError(f"demo: tensor '{n}' differs from the float64 TIES reference in {bad} elements "
                                 f"(max abs {worst:.3g})")
        return len(names)
    finally:
        out.close()
        for ck in ins:
            ck.close()


def run_demo(*, cache_dir: Path | None = None, preset: str = "demo", out_dir: Path | None = None,
             max_memory: str | None = None, quiet: bool = False, echo: Callable[[str], None] = print) -> dict:
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    family_dir = cache / preset
    shape = PRESETS[preset]
    echo(f"pymerge demo: Llama-shaped base + 3 experts, {shape.param_count() / 1e6:.0f}M parameters each, bf16, "
         f"in {family_dir}")
    t0 = time.perf_counter()
    base, experts = make_family(family_dir, shape, n_experts=3, dtype=torch.bfloat16, seed=0, progress=not quiet)
    gen = time.perf_counter() - t0
    if gen > 1:
        echo(f"  generated the checkpoints in {gen:.1f} s (cached for the next run)")
    read_floor_seconds([base, *experts])  # warm the page cache, as a merge right after a download would see it
    floor, in_bytes = read_floor_seconds([base, *experts])

    config = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(e), "parameters": {"weight": w, "density": DEMO_DENSITY}}
                         for e, w in zip(experts, DEMO_WEIGHTS)],
              "dtype": "bfloat16"}
    out = Path(out_dir) if out_dir else cache / "merged"
    report = merge(config, out, overwrite=True, quiet=quiet, max_memory=max_memory)
    checked = verify_output(out, base, experts)
    ratio = report.seconds / floor if floor > 0 else float("inf")
    echo(f"  merged with ties into {report.out_dir}: {report.tensors} tensors, read {in_bytes / 1e9:.2f} GB, "
         f"wrote {report.bytes_written / 1e9:.2f} GB")
    echo(f"  merge: {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s of input), backend {report.backend}")
    echo(f"  read floor (every input byte once, warm cache): {floor:.2f} s ({in_bytes / floor / 1e9:.2f} GB/s)")
    echo(f"  ratio merge / read floor: {ratio:.1f}x")
    echo(f"  verified: {checked} tensors present with the right shapes and dtypes, all finite; "
         f"{VERIFY_TENSORS} recomputed with an independent float64 TIES")
    return {"report": report.to_dict(), "read_floor_s": floor, "input_bytes": in_bytes, "ratio": ratio}
