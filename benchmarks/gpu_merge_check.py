"""Whole merges on a CUDA machine: every GPU kernel set against the CPU backend, output by output.

    python -m benchmarks.gpu_merge_check [--preset demo] [--methods ties,dare_ties,...] [--repeat 2]

For each method it merges the generated family (pymerge.synth, the bench's family) once with the native CPU
backend, then with the streaming GPU executor and each kernel set (--sets: cuda, triton, torch), and prints
the best wall time of each and how many output elements differ from the CPU output, with the largest difference.
The CPU backend is the reference here because its own tests hold it to the torch float64 oracles; the GPU
kernels are meant to give the same bits (same Philox streams, same summation order). Measured, never assumed:
nothing is written to RESULTS.md automatically.
"""

from __future__ import annotations

import argparse
import cProfile
import faulthandler
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from pymerge.api import merge
from pymerge.bench import N_EXPERTS, method_config, read_floor
from pymerge.synth import PRESETS, make_family



def load_output(out: Path) -> dict:
    tensors: dict = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def compare(ref: dict, got: dict) -> tuple[int, int, float]:
    """(elements compared, elements that differ, largest |difference|); a missing tensor counts as all-differ."""
    total = differ = 0
    worst = 0.0
    for name, r in ref.items():
        total += r.numel()
        g = got.get(name)
        if g is None or g.shape != r.shape or g.dtype != r.dtype:
            differ += r.numel()
            worst = float("inf")
            continue
        ne = (r.view(torch.int16 if r.element_size() == 2 else torch.int32)
              != g.view(torch.int16 if g.element_size() == 2 else torch.int32))
        n = int(ne.sum())
        if n:
            differ += n
            worst = max(worst, float((r.double() - g.double()).abs().max()))
    return total, differ, worst


def timed_merge(cfg: Path, out: Path, device: str, backend: str, repeat: int,
                profile: cProfile.Profile | None = None) -> tuple[float | None, str]:
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        if profile is not None:
            profile.enable()
        try:
            merge(cfg, out, quiet=True, overwrite=True, device=device, backend=backend)
        except Exception as e:  # recorded; the other sets still run
            return None, f"{type(e).__name__}: {e}"
        finally:
            if profile is not None:
                profile.disable()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, ""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--methods", default="ties,dare_ties,task_arithmetic,dare_linear,della,della_linear")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--sets", default="cuda,triton", help="GPU kernel sets (torch: the slow twins, for checking)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the GPU merges into this file; print the top")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="pymerge-gpucheck-"))
    base, experts = make_family(work / "family", PRESETS[args.preset], n_experts=N_EXPERTS)
    floor_s, floor_b = read_floor([base, *experts]).of([base, *experts])
    print(f"family {args.preset} at {work}; read floor {floor_s:.3f} s for {floor_b / 1e9:.2f} GB")
    faulthandler.dump_traceback_later(45, repeat=True, file=sys.stderr)  # where a stuck merge stands
    rows = []
    profile = cProfile.Profile() if args.profile else None

    def row(*r) -> None:
        rows.append(r)
        print(f"  {r[0]} {r[1]}: {'-' if r[2] is None else '%.2f s' % r[2]}  {r[3]}", flush=True)

    for method in args.methods.split(","):
        cfg = work / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(method_config(method, base, experts, "bfloat16"), sort_keys=False))
        ref_out = work / f"{method}-cpu"
        cpu_s, err = timed_merge(cfg, ref_out, "cpu", "cpu", args.repeat)
        row(method, "cpu", cpu_s, "reference" if not err else err)
        if err:
            continue
        ref = load_output(ref_out)
        for kset in args.sets.split(","):
            out = work / f"{method}-{kset}"
            s, err = timed_merge(cfg, out, "cuda", kset, args.repeat, profile)
            if err:
                row(method, kset, None, err)
                continue
            total, differ, worst = compare(ref, load_output(out))
            row(method, kset, s, f"{differ}/{total} elements differ, max |diff| {worst:.3g}")
            shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ref_out, ignore_errors=True)
    faulthandler.cancel_dump_traceback_later()
    if profile is not None:
        profile.dump_stats(args.profile)
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(25)
    print(f"\n{'method':<16} {'kernels':<8} {'seconds':>8}  vs CPU output")
    for method, kset, s, note in rows:
        print(f"{method:<16} {kset:<8} {('%.2f' % s) if s is not None else '-':>8}  {note}")


if __name__ == "__main__":
    main()
