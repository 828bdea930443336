"""``pymerge bench``: how fast this machine merges, against the read floor, per backend and against mergekit.

It generates a Llama-shaped base + 3 experts (``pymerge.synth``, cached) or takes the user's config, and in one
run times:

- the read floor: every input byte read once, the faster of copying the tensors out of their memory maps and
  read() of the files, best of three passes after an untimed one that puts the files in the page cache (the
  page-cache floor, not the disk's);
- the write floor: an output-sized file (the base model's tensor bytes) written and fsynced in the work
  directory, best of two: every merge output is made durable, so its disk write is part of any merge. The
  "x I/O floor" column divides by max(read floor, write floor), the time a merge that overlapped reading with
  writing perfectly would still take;
- ``pymerge.merge`` on each requested backend (``cpu``: the native kernels; ``torch``: the pure-torch oracle),
  in this process, on the same warm page cache;
- ``mergekit-yaml`` on the very same YAML file, as a subprocess (its wall time includes its start-up, which
  is measured separately with ``mergekit-yaml --help`` and printed).

With ``--rss`` each pymerge merge runs instead as a ``pymerge run`` subprocess whose anonymous resident memory
(RssAnon: the heap, not the page cache or the mapped inputs) is sampled, and its peak is reported.

Every number is from this run on this machine; the table compares them, nothing is asserted.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import yaml

from .io.direct_write import OutputFile, pwrite_all

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_METHODS = ("ties", "dare_ties", "linear", "breadcrumbs_ties", "della")
TOOLS = ("cpu", "torch", "mergekit", "cuda", "triton", "torch-cuda")
# A pymerge tool is a (device, backend) pair; the GPU ones run the streaming GPU executor.
PYMERGE_TOOLS = {"cpu": ("cpu", "cpu"), "torch": ("cpu", "torch"), "cuda": ("cuda", "cuda"),
                 "triton": ("cuda", "triton"), "torch-cuda": ("cuda", "torch")}
N_EXPERTS = 3

# Per-expert parameters representative of real configs (mergekit's examples): weight 1, density 0.5 for the
# sparsifying methods, breadcrumbs dropping the top 1% and keeping 90%.
EXPERT_PARAMS: Dict[str, Dict[str, float]] = {
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
GLOBAL_PARAMS: Dict[str, Dict[str, float]] = {"sce": {"select_topk": 0.5}, "slerp": {"t": 0.5}}
KNOWN_METHODS = tuple(sorted([*EXPERT_PARAMS, "slerp"]))


def method_config(method: str, base: Path, experts: List[Path], dtype: str) -> Dict[str, Any]:
    """The mergekit-format config dict for ``method`` over ``base`` and ``experts`` (the same file for both tools)."""
    cfg: Dict[str, Any] = {"merge_method": method, "base_model": str(base), "dtype": dtype}
    if method == "slerp":  # exactly two models: the base and the first expert
        cfg["models"] = [{"model": str(base)}, {"model": str(experts[0])}]
    elif method == "linear":  # no base role: every model is an input with its weight
        del cfg["base_model"]
        cfg["models"] = [{"model": str(p), "parameters": dict(EXPERT_PARAMS[method])} for p in [base, *experts]]
    else:
        models: List[Dict[str, Any]] = [{"model": str(base)}]
        for p in experts:
            entry: Dict[str, Any] = {"model": str(p)}
            if EXPERT_PARAMS[method]:
                entry["parameters"] = dict(EXPERT_PARAMS[method])
            models.append(entry)
        cfg["models"] = models
    if method in GLOBAL_PARAMS:
        cfg["parameters"] = dict(GLOBAL_PARAMS[method])
    return cfg


def config_inputs(config_path: Path) -> List[Path]:
    """The distinct local model directories a config file reads (resolved as a merge would resolve them)."""
    from .config import load_config
    from .plan import build_plan

    plan = build_plan(load_config(config_path))
    try:
        return list(dict.fromkeys(Path(ck.path) for ck in plan.checkpoints.values()))
    finally:
        plan.close()


# ------------------------------------------------------------------------------------------ the read floor

def _copy_model(path: Path, buf: "torch.Tensor") -> int:
    """Copy every tensor of the checkpoint at ``path`` byte for byte into ``buf``; return the bytes copied."""
    import torch

    from .io.checkpoint import Checkpoint

    total = 0
    with Checkpoint.open(path) as ck:
        for name in ck.names():
            src = ck.tensor(name).reshape(-1).view(torch.uint8)
            buf[: src.numel()].copy_(src)
            total += src.numel()
    return total


@dataclass
class Floor:
    """Seconds and bytes of the best timed read pass, per model directory."""

    seconds: Dict[str, float] = field(default_factory=dict)
    nbytes: Dict[str, int] = field(default_factory=dict)

    def of(self, paths: List[Path]) -> tuple[float, int]:
        """(seconds, bytes) of reading exactly these models once."""
        return sum(self.seconds[str(p)] for p in paths), sum(self.nbytes[str(p)] for p in paths)


def _read_files(path: Path, buf: bytearray) -> int:
    """read() every weight file of the checkpoint at ``path`` into ``buf`` (``cat`` without the pipe)."""
    from .io.checkpoint import Checkpoint

    with Checkpoint.open(path) as ck:
        files = ck.files()
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def read_floor(paths: List[Path], passes: int = 3) -> Floor:
    """Per model, the fastest of ``passes`` timed passes of two ways to read every input byte once, after a
    warming pass: copying each tensor out of its memory map, and read() of the files into a 64 MiB buffer.

    The best rather than one pass: on a shared machine a single scheduling hiccup moves one pass several-fold.
    The faster of the two ways, so the floor is what the hardware allows, not what one access pattern costs
    (read() avoids the page faults of a fresh mapping and measured ~1.6x faster on the 2-core machines).
    """
    import torch

    from .io.checkpoint import Checkpoint

    biggest = 0
    for p in paths:
        with Checkpoint.open(p) as ck:
            biggest = max([biggest] + [ck.info(n).nbytes for n in ck.names()])
    buf = torch.empty(biggest, dtype=torch.uint8)
    buf.fill_(0)  # fault the buffer's pages in now, not inside the timed pass
    chunk = bytearray(64 << 20)
    for p in paths:
        _copy_model(p, buf)
    res = Floor()
    for _ in range(max(1, passes)):
        for p in paths:
            for read in (lambda: _copy_model(p, buf), lambda: _read_files(p, chunk)):
                t0 = time.perf_counter()
                nbytes = read()
                s = time.perf_counter() - t0
                res.nbytes.setdefault(str(p), nbytes)  # tensor bytes (the files add only their headers)
                res.seconds[str(p)] = min(res.seconds.get(str(p), s), s)
    return res


def write_floor(nbytes: int, directory: Path, passes: int = 2) -> float:
    """Seconds to write ``nbytes`` into a new file in ``directory`` in 64 MiB pieces and fsync it (the
    durability every merge output gets), best of ``passes`` and of two ways: plain buffered writes, and
    ``OutputFile``'s (``O_DIRECT`` where the filesystem has it, as the merge writes), so the floor is the
    faster of the two on this disk. The file is removed after each."""
    chunk = memoryview(bytes(64 << 20))
    best = float("inf")
    for i in range(max(1, passes)):
        for direct in (False, True):
            path = directory / f".pymerge-write-floor-{os.getpid()}-{i}"
            try:
                t0 = time.perf_counter()
                f = OutputFile(path, truncate=True)
                try:
                    fd = f.fd
                    for at in range(0, nbytes, len(chunk)):
                        piece = chunk[: min(len(chunk), nbytes - at)]
                        if direct:
                            f.pwrite(piece, at)
                        else:
                            pwrite_all(fd, piece, at)
                    os.fsync(fd)
                finally:
                    f.close()
                best = min(best, time.perf_counter() - t0)
            finally:
                path.unlink(missing_ok=True)
    return best


# ------------------------------------------------------------------------------------------ the tools

@dataclass
class Run:
    """One timed merge (``seconds`` None when it failed or did not apply; ``note`` says why)."""

    method: str
    tool: str
    seconds: Optional[float]
    input_bytes: int
    floor_seconds: float
    note: Optional[str] = None
    peak_anon_mib: Optional[float] = None
    failed: bool = False
    io_floor_seconds: Optional[float] = None  # max(read floor, write floor)

    @property
    def x_floor(self) -> Optional[float]:
        return None if self.seconds is None else self.seconds / self.floor_seconds

    @property
    def x_io_floor(self) -> Optional[float]:
        return None if self.seconds is None or not self.io_floor_seconds else self.seconds / self.io_floor_seconds


def native_support(method: str, tool: str) -> Optional[str]:
    """Why pymerge's ``tool`` backend cannot run ``method`` here (None when it can)."""
    from ._native import native_unavailable_reason
    from .errors import PymergeError
    from .ops.backend import NATIVE_METHODS, backend_built, resolve_backend

    device, backend = PYMERGE_TOOLS[tool]
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        try:
            resolve_backend(backend, method, device)
        except PymergeError as e:
            return str(e)
        return None
    if tool == "torch":
        return None
    if not backend_built(tool):
        return f"not built: {native_unavailable_reason()}"
    if method not in NATIVE_METHODS[tool]:
        return f"no {tool} kernel for {method} yet"
    return None


def time_pymerge(cfg_path: Path, out: Path, tool: str,
                 max_memory: Optional[str]) -> tuple[Optional[float], Optional[str]]:
    """(wall seconds, error) of one in-process ``pymerge.merge`` of the config file with ``tool``'s device and
    backend."""
    from .api import merge

    device, backend = PYMERGE_TOOLS[tool]
    t0 = time.perf_counter()
    try:
        merge(cfg_path, out, quiet=True, overwrite=True, max_memory=max_memory, device=device, backend=backend)
    except Exception as e:  # a failing method is recorded and the others still run
        traceback.print_exc(file=sys.stderr)
        return None, f"{type(e).__name__}: {e}"
    return time.perf_counter() - t0, None


def _rss_anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def time_pymerge_subprocess(cfg_path: Path, out: Path, tool: str, max_memory: Optional[str],
                            log_path: Path) -> tuple[Optional[float], Optional[float], Optional[str]]:
    """(wall seconds, peak RssAnon MiB, error) of ``pymerge run`` in a subprocess, RssAnon sampled every 10 ms."""
    device, backend = PYMERGE_TOOLS[tool]
    cmd = [sys.executable, "-m", "pymerge.cli", "run", str(cfg_path), str(out), "--overwrite", "-q",
           "--device", device, "--backend", backend]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    peak = 0
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_anon_kib(proc.pid))
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        done.set()
        sampler.join()
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
        return None, None, f"pymerge run exited {code}: {tail}"
    return seconds, peak / 1024, None


def _mergekit_exe() -> str:
    # The mergekit-yaml next to this interpreter (a venv that is not activated still finds its own).
    local = Path(sys.executable).with_name("mergekit-yaml")
    return str(local) if local.exists() else (shutil.which("mergekit-yaml") or "mergekit-yaml")


def mergekit_startup_seconds(runs: int = 3) -> Optional[float]:
    """Best wall time of ``mergekit-yaml --help`` over ``runs`` (interpreter start plus mergekit's imports)."""
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
    # mergekit leaves its output's dirty pages to the kernel's writeback, which then competed with the next
    # timed merge for the disk (a linear merge right after mergekit's dare_ties measured 3.5 s against 2.3-2.9 s
    # in quiet runs): flush them outside the timed region.
    if hasattr(os, "sync"):
        os.sync()
    if proc.returncode != 0:
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-3:])
        return None, f"mergekit-yaml exited {proc.returncode}: {tail} (log: {log_path})"
    return seconds, None


# ------------------------------------------------------------------------------------------ reporting

def _fmt(x: Optional[float], spec: str) -> str:
    """``x`` formatted by ``spec``, or "-" right-aligned to the spec's width."""
    if x is not None:
        return format(x, spec)
    width = spec.split(".")[0].lstrip("<>^")
    return format("-", f">{width}") if width.isdigit() else "-"


def format_table(runs: List[Run]) -> str:
    """One row per (method, tool): seconds, input GB/s, x floor, and how many times faster than mergekit."""
    mk = {r.method: r.seconds for r in runs if r.tool == "mergekit"}
    rss = any(r.peak_anon_mib is not None for r in runs)
    head = (f"{'method':<17} {'tool':<18} {'seconds':>9} {'GB/s in':>8} {'x floor':>8} {'x I/O floor':>11} "
            f"{'vs mergekit':>11}" + (f" {'peak anon MiB':>13}" if rss else ""))
    lines = [head, "-" * len(head)]
    for r in runs:
        speed = None
        if r.tool.startswith("pymerge") and r.seconds and mk.get(r.method):
            speed = mk[r.method] / r.seconds
        gbps = None if r.seconds is None else r.input_bytes / r.seconds / 1e9
        line = (f"{r.method:<17} {r.tool:<18} {_fmt(r.seconds, '9.2f')} {_fmt(gbps, '8.3f')} "
                f"{_fmt(r.x_floor, '8.2f')} {_fmt(r.x_io_floor, '11.2f')} "
                f"{_fmt(speed, '10.1f') + ('x' if speed else ' '):>11}")
        if rss:
            line += f" {_fmt(r.peak_anon_mib, '13.0f')}"
        if r.note:
            line += f"  {'FAILED: ' if r.failed else ''}{r.note[:160]}"
        lines.append(line)
    return "\n".join(lines)


def machine_info() -> Dict[str, Any]:
    """pymerge version and commit (when run from a git checkout), CPU, cores, RAM, threads and versions."""
    import torch

    from . import __version__

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
        commit = "-"
    return {"pymerge": __version__, "commit": commit, "cpu": cpu, "nproc": os.cpu_count(),
            "ram_gib": round(ram / 2**30, 1), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------------ the run

@dataclass
class BenchOptions:
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    tools: List[str] = field(default_factory=lambda: list(TOOLS))
    preset: str = "1b"
    layers: Optional[int] = None  # override the preset's layer count (memory scaling)
    dtype: str = "bfloat16"
    config: Optional[Path] = None  # bench this config instead of a generated family
    cache_dir: Optional[Path] = None
    work_dir: Optional[Path] = None
    max_memory: Optional[str] = None
    repeat: int = 1
    rss: bool = False
    json_path: Optional[Path] = None


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


def _jobs(opts: BenchOptions, work: Path, echo: Callable[[str], None]) -> tuple[List[tuple[str, Path]], List[Path]]:
    """[(label, config file)] to time and every model directory they read."""
    if opts.config is not None:
        inputs = config_inputs(opts.config)
        method = yaml.safe_load(opts.config.read_text()).get("merge_method", "?")
        return [(str(method), opts.config)], inputs
    import torch

    from .synth import PRESETS, make_family

    shape = PRESETS[opts.preset]
    if opts.layers is not None:
        from dataclasses import replace

        shape = replace(shape, layers=opts.layers)
    name = opts.preset + (f"-{opts.layers}l" if opts.layers is not None else "")
    cache = opts.cache_dir or Path.home() / ".cache" / "pymerge" / "bench" / name
    t0 = time.perf_counter()
    base, experts = make_family(cache, shape, n_experts=N_EXPERTS, dtype=getattr(torch, opts.dtype), progress=True)
    echo(f"family {name} ({shape.param_count() / 1e6:.1f}M params/model, {opts.dtype}, base + {N_EXPERTS}) ready "
         f"in {time.perf_counter() - t0:.1f} s at {cache}")
    jobs = []
    for method in opts.methods:
        cfg_path = work / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(method_config(method, base, experts, opts.dtype), sort_keys=False))
        jobs.append((method, cfg_path))
    return jobs, [base, *experts]


def run_bench(opts: BenchOptions, echo: Callable[[str], None] = print) -> List[Run]:
    """Time the read floor and every (method, tool); print progress and the table through ``echo``."""
    cache_root = opts.cache_dir or Path.home() / ".cache" / "pymerge" / "bench"
    work = opts.work_dir or cache_root / "runs"
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    echo("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    jobs, inputs = _jobs(opts, work, echo)

    floor = read_floor(inputs)
    all_s, all_b = floor.of(inputs)
    echo(f"read floor: {all_b / 1e9:.3f} GB in {all_s:.3f} s = {all_b / all_s / 1e9:.2f} GB/s "
         "(warm page cache; per model the best of 3 passes of mmap copy and of read())")
    out_bytes = floor.of(inputs[:1])[1]  # the merged model has the base's tensors
    wfloor = write_floor(out_bytes, work)
    echo(f"write floor: {out_bytes / 1e9:.3f} GB written and fsynced in {wfloor:.3f} s = "
         f"{out_bytes / wfloor / 1e9:.2f} GB/s (best of 2, in {work})")
    mk_startup = None
    if "mergekit" in opts.tools:
        mk_startup = mergekit_startup_seconds()
        echo(f"mergekit-yaml start-up (--help, best of 3): {_fmt(mk_startup, '.2f')} s")

    runs: List[Run] = []
    for label, cfg_path in jobs:
        used = config_inputs(cfg_path)
        floor_s, in_bytes = floor.of(used)
        io_s = max(floor_s, wfloor)
        runs.append(Run(label, "read floor", floor_s, in_bytes, floor_s, io_floor_seconds=io_s))
        runs.append(Run(label, "write floor", wfloor, in_bytes, floor_s, io_floor_seconds=io_s))
        for tool in opts.tools:
            out = work / f"{label}-{tool}"
            if tool == "mergekit":
                seconds, err = _best_of(opts.repeat, lambda: time_mergekit(cfg_path, out, work / f"{label}-mergekit.log"))
                run = Run(label, "mergekit", seconds, in_bytes, floor_s, err, failed=err is not None,
                          io_floor_seconds=io_s)
            else:
                why = native_support(label, tool) if opts.config is None else None
                if why is not None:
                    runs.append(Run(label, f"pymerge-{tool}", None, in_bytes, floor_s, f"n/a: {why}",
                                    io_floor_seconds=io_s))
                    echo(f"  {label:<17} pymerge-{tool:<10} n/a ({why})")
                    continue
                if opts.rss:
                    seconds, peak, err = _best_of(opts.repeat, lambda: time_pymerge_subprocess(
                        cfg_path, out, tool, opts.max_memory, work / f"{label}-{tool}.log"))
                else:
                    (seconds, err), peak = _best_of(opts.repeat, lambda: time_pymerge(cfg_path, out, tool,
                                                                                       opts.max_memory)), None
                run = Run(label, f"pymerge-{tool}", seconds, in_bytes, floor_s, err, peak, failed=err is not None,
                          io_floor_seconds=io_s)
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run)
            echo(f"  {label:<17} {run.tool:<18} {_fmt(run.seconds, '.2f')} s"
                 + (f"  FAILED {run.note}" if run.failed else ""))

    echo("")
    echo(format_table(runs))
    echo("GB/s in: input bytes the method reads / seconds. x floor: seconds / read-floor seconds for those "
         "inputs. x I/O floor: seconds / max(read floor, write floor). vs mergekit: mergekit wall / pymerge wall "
         "(mergekit's includes its start-up, above)."
         + (" peak anon MiB: the highest RssAnon of the `pymerge run` process (heap, not mapped files)."
            if opts.rss else ""))
    if opts.json_path:
        opts.json_path.write_text(json.dumps({
            "machine": info, "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
            "read_floor": {"seconds": floor.seconds, "bytes": floor.nbytes},
            "write_floor": {"seconds": wfloor, "bytes": out_bytes},
            "mergekit_startup_seconds": mk_startup,
            "runs": [dict(asdict(r), x_floor=r.x_floor, x_io_floor=r.x_io_floor) for r in runs],
        }, indent=2) + "\n")
        echo(f"wrote {opts.json_path}")
    return runs
