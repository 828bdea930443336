"""Whole-model merge benchmark: the read floor, ``pymerge.merge`` and ``mergekit-yaml`` on the same checkpoints.

    python -m benchmarks.whole_merge [--preset demo] [--methods ties,linear] [--skip-mergekit] [--json OUT]

One synthetic family (base + 3 experts, bf16, ``pymerge.synth``) is generated once into a cache directory and
reused. In one run the script then times:

- the read floor: every input tensor copied once from its memory map into a reusable buffer, after an untimed
  pass that puts the files in the page cache (so it is the page-cache floor, not the disk's);
- ``pymerge.merge`` for each method, in this process, on the same warm page cache;
- ``mergekit-yaml`` on the very same YAML file, as a subprocess (its wall time includes Python start-up and
  mergekit's imports; that start-up is measured separately with ``mergekit-yaml --help``).

Every number is from this run on this machine; the table compares them, nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import yaml

DEFAULT_METHODS = "ties,dare_ties,linear,task_arithmetic,breadcrumbs_ties,della,slerp"
N_EXPERTS = 3

# Per-expert parameters representative of real configs (mergekit's examples): weight 1, density 0.5 for the
# sparsifying methods, breadcrumbs dropping the top 1% and keeping 90%.
_EXPERT_PARAMS: Dict[str, Dict[str, float]] = {
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.5},
    "dare_ties": {"weight": 1.0, "density": 0.5},
    "dare_linear": {"weight": 1.0, "density": 0.5},
    "breadcrumbs": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
    "della": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    "della_linear": {"weight": 1.0, "density": 0.5, "epsilon": 0.1},
    "model_stock": {},
    "sce": {},
}
_GLOBAL_PARAMS: Dict[str, Dict[str, float]] = {"sce": {"select_topk": 0.5}, "slerp": {"t": 0.5}}
KNOWN_METHODS = sorted([*_EXPERT_PARAMS, "slerp"])


def method_config(method: str, base: Path, experts: List[Path], dtype: str) -> Dict[str, Any]:
    """The mergekit-format config dict for ``method`` over ``base`` and ``experts`` (same file for both tools)."""
    cfg: Dict[str, Any] = {"merge_method": method, "base_model": str(base), "dtype": dtype}
    if method == "slerp":  # exactly two models: the base and the first expert
        cfg["models"] = [{"model": str(base)}, {"model": str(experts[0])}]
    elif method == "linear":  # no base role: every model is an input with its weight
        del cfg["base_model"]
        cfg["models"] = [{"model": str(p), "parameters": dict(_EXPERT_PARAMS[method])} for p in [base, *experts]]
    else:
        models: List[Dict[str, Any]] = [{"model": str(base)}]
        for p in experts:
            entry: Dict[str, Any] = {"model": str(p)}
            if _EXPERT_PARAMS[method]:
                entry["parameters"] = dict(_EXPERT_PARAMS[method])
            models.append(entry)
        cfg["models"] = models
    if method in _GLOBAL_PARAMS:
        cfg["parameters"] = dict(_GLOBAL_PARAMS[method])
    return cfg


def config_inputs(cfg: Dict[str, Any]) -> List[Path]:
    """The distinct model directories a config reads."""
    paths = [Path(m["model"]) for m in cfg["models"]]
    if "base_model" in cfg:
        paths.append(Path(cfg["base_model"]))
    return list(dict.fromkeys(paths))


# ---------------------------------------------------------------------------------------------- read floor

def _copy_model(path: Path, buf: torch.Tensor) -> int:
    """Copy every tensor of the checkpoint at ``path`` byte for byte into ``buf``; return the bytes copied."""
    from pymerge.io.checkpoint import Checkpoint

    total = 0
    with Checkpoint.open(path) as ck:
        for name in ck.names():
            src = ck.tensor(name).reshape(-1).view(torch.uint8)
            buf[: src.numel()].copy_(src)
            total += src.numel()
    return total


def _largest_tensor_bytes(paths: List[Path]) -> int:
    from pymerge.io.checkpoint import Checkpoint

    biggest = 0
    for p in paths:
        with Checkpoint.open(p) as ck:
            biggest = max([biggest] + [ck.info(n).nbytes for n in ck.names()])
    return biggest


@dataclass
class FloorResult:
    """Seconds and bytes of one timed read pass per model directory."""

    seconds: Dict[str, float] = field(default_factory=dict)
    nbytes: Dict[str, int] = field(default_factory=dict)

    def for_models(self, paths: List[Path]) -> tuple[float, int]:
        """(seconds, bytes) of reading exactly these models once."""
        return (sum(self.seconds[str(p)] for p in paths), sum(self.nbytes[str(p)] for p in paths))


def read_floor(paths: List[Path], passes: int = 3) -> FloorResult:
    """Per model, the best of ``passes`` timed passes that copy every input byte once, after a warming pass.

    The best rather than one pass: a single pass takes tenths of a second on the demo preset, where one
    scheduling hiccup on a shared machine would move it several-fold.
    """
    buf = torch.empty(_largest_tensor_bytes(paths), dtype=torch.uint8)
    buf.fill_(0)  # fault the buffer's pages in now, not inside the timed pass
    for p in paths:
        _copy_model(p, buf)
    res = FloorResult()
    for _ in range(max(1, passes)):
        for p in paths:
            t0 = time.perf_counter()
            res.nbytes[str(p)] = _copy_model(p, buf)
            seconds = time.perf_counter() - t0
            res.seconds[str(p)] = min(res.seconds.get(str(p), seconds), seconds)
    return res


# ---------------------------------------------------------------------------------------------- the tools

@dataclass
class Run:
    """One timed merge (``seconds`` is None when it failed; ``error`` then says why)."""

    method: str
    tool: str
    seconds: Optional[float]
    input_bytes: int
    floor_seconds: float
    error: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> Optional[float]:
        return None if self.seconds is None else self.input_bytes / self.seconds / 1e9

    @property
    def x_floor(self) -> Optional[float]:
        return None if self.seconds is None else self.seconds / self.floor_seconds


def time_pymerge(cfg_path: Path, out: Path, max_memory: Optional[str]) -> tuple[Optional[float], Dict, Optional[str]]:
    """(wall seconds, MergeReport dict, error) of one ``pymerge.merge`` of the config file."""
    import pymerge

    t0 = time.perf_counter()
    try:
        report = pymerge.merge(cfg_path, out, quiet=True, overwrite=True, max_memory=max_memory)
    except Exception as e:  # a failing method is recorded and the others still run
        traceback.print_exc(file=sys.stderr)
        return None, {}, f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, report.to_dict(), None


def _mergekit_exe() -> str:
    # The mergekit-yaml next to this interpreter (a venv that is not activated still finds its own).
    local = Path(sys.executable).with_name("mergekit-yaml")
    return str(local) if local.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")


def mergekit_startup_seconds(runs: int = 3) -> Optional[float]:
    """Best wall time of ``mergekit-yaml --help`` over ``runs``: interpreter start plus mergekit's imports.

    The best of a few, because on a shared machine a single start-up can be inflated by seconds. It is
    reported beside the merge times (not subtracted) so a reader sees how much of mergekit's time it is.
    """
    best: Optional[float] = None
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            subprocess.run([_mergekit_exe(), "--help"], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        best = min(best or float("inf"), time.perf_counter() - t0)
    return best


def time_mergekit(cfg_path: Path, out: Path, log_path: Path) -> tuple[Optional[float], Optional[str]]:
    """(wall seconds, error) of ``mergekit-yaml CONFIG OUT`` with its default options (CPU)."""
    cmd = [_mergekit_exe(), str(cfg_path), str(out), "--quiet", "--random-seed", "0"]
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    except OSError as e:
        return None, f"cannot run mergekit-yaml: {e}"
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return None, f"mergekit-yaml exited {proc.returncode}: {' | '.join(tail)} (log: {log_path})"
    return seconds, None


# ---------------------------------------------------------------------------------------------- reporting

def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(runs: List[Run]) -> str:
    """The results table: one row per (method, tool); the speed-up is mergekit's wall time over pymerge's."""
    mk = {r.method: r.seconds for r in runs if r.tool == "mergekit"}
    head = f"{'method':<17} {'tool':<9} {'seconds':>9} {'GB/s in':>8} {'x floor':>8} {'vs mergekit':>11}"
    lines = [head, "-" * len(head)]
    for r in runs:
        speed = None
        if r.tool == "pymerge" and r.seconds and mk.get(r.method):
            speed = mk[r.method] / r.seconds
        line = (f"{r.method:<17} {r.tool:<9} {_fmt(r.seconds, '9.2f')} {_fmt(r.gb_per_s, '8.3f')} "
                f"{_fmt(r.x_floor, '8.1f')} {_fmt(speed, '10.2f') + ('x' if speed else ' '):>11}")
        if r.error:
            line += f"  FAILED: {r.error[:160]}"
        lines.append(line)
    return "\n".join(lines)


def machine_info() -> Dict[str, Any]:
    """Git commit, CPU model, core count, RAM and software versions, for the record."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "uncommitted"
    return {"commit": commit, "cpu": cpu, "nproc": os.cpu_count(), "ram_gib": round(ram / 2**30, 1),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from pymerge.synth import PRESETS

    ap = argparse.ArgumentParser(prog="python -m benchmarks.whole_merge", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="checkpoint family size")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    ap.add_argument("--skip-mergekit", action="store_true", help="time pymerge and the read floor only")
    ap.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    ap.add_argument("--cache-dir", type=Path, help="family cache (default ~/.cache/pymerge/bench/<preset>)")
    ap.add_argument("--work-dir", type=Path, help="where merge outputs go (default <cache-dir>/runs); "
                    "each output is deleted once timed")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="checkpoint dtype and the config's dtype (same for both tools)")
    ap.add_argument("--max-memory", default=None, help="pymerge working-memory budget (default: its own)")
    ap.add_argument("--repeat", type=int, default=1, help="run each merge this many times and keep the best")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in KNOWN_METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(KNOWN_METHODS)}")
    return args


def _best_of(n: int, timed: Callable[[], tuple]) -> tuple:
    """The result of ``timed()`` (seconds first) with the fewest seconds over ``n`` runs; stops at a failure."""
    best = None
    for _ in range(max(1, n)):
        res = timed()
        if res[0] is None:
            return res
        if best is None or res[0] < best[0]:
            best = res
    return best


def main(argv: Optional[List[str]] = None) -> int:
    from pymerge.synth import PRESETS, make_family

    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cache = args.cache_dir or Path.home() / ".cache" / "pymerge" / "bench" / args.preset
    work = args.work_dir or cache / "runs"
    work.mkdir(parents=True, exist_ok=True)

    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    t0 = time.perf_counter()
    base, experts = make_family(cache, PRESETS[args.preset], n_experts=N_EXPERTS, dtype=dtype, progress=True)
    print(f"family {args.preset} ({PRESETS[args.preset].param_count() / 1e6:.1f}M params/model, {args.dtype}) "
          f"ready in {time.perf_counter() - t0:.1f} s at {cache}", flush=True)

    floor = read_floor([base, *experts])
    all_s, all_b = floor.for_models([base, *experts])
    print(f"read floor: {all_b / 1e9:.3f} GB in {all_s:.3f} s = {all_b / all_s / 1e9:.2f} GB/s (warm page cache, best of 3 passes per model)",
          flush=True)
    mk_startup = None if args.skip_mergekit else mergekit_startup_seconds()
    if not args.skip_mergekit:
        print(f"mergekit-yaml start-up (--help, best of 3): {_fmt(mk_startup, '.2f')} s", flush=True)

    runs: List[Run] = []
    for method in args.methods:
        cfg = method_config(method, base, experts, args.dtype)
        cfg_path = work / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        floor_s, in_bytes = floor.for_models(config_inputs(cfg))

        out = work / f"{method}-pymerge"
        seconds, report, err = _best_of(args.repeat, lambda: time_pymerge(cfg_path, out, args.max_memory))
        runs.append(Run(method, "pymerge", seconds, in_bytes, floor_s, err, {"report": report}))
        shutil.rmtree(out, ignore_errors=True)
        print(f"  {method:<17} pymerge  {_fmt(seconds, '.2f')} s" + (f"  FAILED {err}" if err else ""), flush=True)

        if not args.skip_mergekit:
            out = work / f"{method}-mergekit"
            seconds, err = _best_of(args.repeat, lambda: time_mergekit(cfg_path, out, work / f"{method}-mergekit.log"))
            runs.append(Run(method, "mergekit", seconds, in_bytes, floor_s, err))
            shutil.rmtree(out, ignore_errors=True)
            print(f"  {method:<17} mergekit {_fmt(seconds, '.2f')} s" + (f"  FAILED {err}" if err else ""),
                  flush=True)

    print()
    print(format_table(runs))
    print("GB/s in: input bytes of the models the method reads / seconds. x floor: seconds / read-floor seconds "
          "for those models. vs mergekit: mergekit wall / pymerge wall (mergekit's includes its start-up, "
          "measured above).")
    if args.json:
        args.json.write_text(json.dumps({
            "preset": args.preset, "dtype": args.dtype, "machine": info, "cache_dir": str(cache),
            "read_floor": {"seconds": floor.seconds, "bytes": floor.nbytes},
            "mergekit_startup_seconds": mk_startup,
            "runs": [dict(asdict(r), gb_per_s=r.gb_per_s, x_floor=r.x_floor) for r in runs],
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
