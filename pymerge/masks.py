"""Per-task masks of the mask-based merge methods (TALL masks, EMR, MMER): build them, apply them.

    >>> from pymerge.masks import build_task_masks, apply_task_mask
    >>> build_task_masks("tall.yml", "out/masks.safetensors")    # merge_method: tall_masks | emr | mmer
    >>> pymerge.merge("tall.yml", "out/merged")                   # the shared model theta_0 + tau
    >>> state = apply_task_mask("out/merged", "out/masks.safetensors", "path/to/expert_a")

Task t's model is ``theta_0 + r_t * m_t * (merged - theta_0)`` (m_t: its mask, r_t: its rescaler: 1 for TALL,
EMR's lambda_t, MMER's lambda). Where m_t is 0 the base weight comes back exactly; where it is 1 and r_t = 1 the
merged weight does. The base is read from the path recorded in the masks file unless ``base`` is given.
The masks file format is described in ``pymerge/io/packed_masks.py`` and docs/methods/masks.md.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from .config import MergeConfig, load_config
from .errors import ConfigError, MergeError
from .executor import ExecStats, chunk_rows, run_global_passes
from .io.checkpoint import Checkpoint
from .io.packed_masks import PackedMasks, PackedMasksWriter
from .methods import Chunk
from .plan import Plan, PlannedTensor, build_plan
from .sizes import default_max_memory, parse_size

log = logging.getLogger("pymerge")

MASK_METHODS = ("tall_masks", "emr", "mmer")


@dataclass
class MasksReport:
    path: str
    method: str
    tasks: list[str]
    rescalers: list[float]
    tensors: int
    bytes_written: int
    seconds: float
    chunked_tensors: int = 0
    mask_density: list[float] = field(default_factory=list)  # fraction of ones per task over the model


# ------------------------------------------------------------------------------------------------- building


def build_task_masks(config: MergeConfig | str | Path | dict, out_path: str | Path, *, method: str | None = None,
                     max_memory: str | int | None = None, allow_pickle: bool = False, overwrite: bool = False,
                     allow_nonfinite: bool = False) -> MasksReport:
    """Write the per-task packed masks (and rescalers) of the models ``config`` names to ``out_path``.

    ``method`` (tall_masks, emr or mmer) overrides the config's merge_method; the method's parameters come from
    the config as for a merge. The inputs are streamed tensor by tensor in row chunks within ``max_memory``;
    the file is written to a temporary sibling and renamed into place when complete.
    """
    t0 = time.perf_counter()
    config = load_config(config)
    name = method or config.merge_method
    if name not in MASK_METHODS:
        hint = " (consensus is a single model: build the TALL masks with method='tall_masks')" \
            if name == "consensus" else ""
        raise ConfigError(f"masks: method '{name}' has no per-task masks; expected one of "
                          f"{', '.join(MASK_METHODS)}{hint}")
    if name != config.merge_method:
        source = config.source_path
        config = config.model_copy(update={"merge_method": name})
        config._source_path = source
    budget = parse_size(max_memory, "max_memory") if max_memory is not None else default_max_memory()
    plan = build_plan(config, allow_pickle=allow_pickle)
    writer = None
    try:
        tasks = _tasks(plan)
        # opened first: an existing output (without overwrite) fails before any weight is read
        writer = PackedMasksWriter(out_path, tasks, [(pt.name, pt.shape) for pt in plan.tensors],
                                   _metadata(plan, name), overwrite=overwrite)
        stats = ExecStats()
        checked = run_global_passes(plan, budget, stats, check_finite=not allow_nonfinite)
        acc = _Accumulator(len(tasks), emr=name == "emr")
        for pt in plan.tensors:
            _tensor_masks(plan, pt, writer, budget, stats, acc, check_finite=not (allow_nonfinite or checked))
        rescalers = _rescalers(plan, name, acc, tasks)
        final = writer.commit(rescalers)
        size = writer.file_size
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        plan.close()
    total = max(acc.elements, 1)
    report = MasksReport(path=str(final), method=name, tasks=tasks, rescalers=rescalers, tensors=len(plan.tensors),
                         bytes_written=size, seconds=time.perf_counter() - t0, chunked_tensors=stats.chunked_tensors,
                         mask_density=[c / total for c in acc.ones])
    log.info("wrote %s: %s masks of %d tasks, %d tensors", final, name, len(tasks), report.tensors)
    return report


def _tasks(plan: Plan) -> list[str]:
    """The task labels (the experts, in input order); every tensor must come from the same ones."""
    first = plan.tensors[0].job
    tasks = [first.inputs[i] for i in first.expert_indices]
    for pt in plan.tensors:
        got = [pt.job.inputs[i] for i in pt.job.expert_indices]
        if got != tasks:
            raise ConfigError(f"masks: every tensor must be merged from the same task models; tensor '{pt.name}' "
                              f"has {got}, tensor '{plan.tensors[0].name}' has {tasks}")
    if not tasks:
        raise ConfigError("masks: the config names no task model besides the base")
    return tasks


def _metadata(plan: Plan, method: str) -> dict[str, str]:
    first = plan.tensors[0]
    base_label = first.job.inputs[first.job.base_index]
    ck = plan.checkpoints[base_label]
    files = ck.files()
    base_path = files[0] if len(files) == 1 else ck.path
    task_params = [first.job.model_params[i] for i in first.job.expert_indices]
    return {"method": method, "base_model": str(Path(base_path).resolve()),
            "params": json.dumps(first.job.params), "task_params": json.dumps(task_params),
            "reconstruct": "theta_task = theta_base + rescaler[task] * mask[task] * (theta_merged - theta_base)"}


@dataclass
class _Accumulator:
    """Per-task sums over the model: EMR's sum over tensors of mean|tau_t| and mean|M_t tau_uni|; mask counts."""

    n: int
    emr: bool
    tau_means: list[float] = field(default_factory=list)
    masked_means: list[float] = field(default_factory=list)
    ones: list[int] = field(default_factory=list)
    elements: int = 0

    def __post_init__(self):
        self.tau_means = [0.0] * self.n
        self.masked_means = [0.0] * self.n
        self.ones = [0] * self.n


_BLOCK = 1 << 28  # elements per bincount: 2**28 mantissas < 2**24 sum below 2**53, exact in its float64 bins


def abs_sum_bins(x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [256]: sum of |x| (fp32, where ``keep``) by binary exponent e, as integer mantissa sums c_e with
    sum |x| = sum_e c_e * 2**(max(e, 1) - 150) exactly. Exact sums make EMR's rescalers independent of the
    chunking and the thread count (a float sum's rounding depends on both)."""
    keys = x.reshape(-1).view(torch.int32) & 0x7FFFFFFF
    e = keys >> 23
    m = (keys & 0x7FFFFF) | ((e > 0).to(torch.int32) << 23)
    if keep is not None:
        m = m * keep.reshape(-1)
    out = torch.zeros(256, dtype=torch.int64)
    for a in range(0, e.numel(), _BLOCK):
        out += torch.bincount(e[a:a + _BLOCK], weights=m[a:a + _BLOCK].to(torch.float64), minlength=256).to(
            torch.int64)
    return out


def _bins_mean(bins: torch.Tensor, numel: int) -> float:
    """(sum encoded by ``abs_sum_bins``) / numel, correctly rounded."""
    total = sum(int(c) << (max(e, 1) - 1) for e, c in enumerate(bins.tolist()) if c)  # in units of 2**-149
    return math.ldexp(total / numel, -149)


def _tensor_masks(plan: Plan, pt: PlannedTensor, writer: PackedMasksWriter, budget: int, stats: ExecStats,
                  acc: _Accumulator, *, check_finite: bool) -> None:
    """Stream one tensor's rows through the method's ``decompose`` and append its masks to the file."""
    job = pt.job
    bits = writer.tensor(pt.name)
    if job.numel == 0:
        bits.close()
        return
    merge = plan.method.start(job)
    step = chunk_rows(job, plan.method.scratch_factor, 1, budget)
    if step < job.rows:
        stats.chunked_tensors += 1
    views = [plan.checkpoints[m].tensor(n).reshape(job.rows, job.row_numel) for m, n in pt.sources]
    tau_bins = [torch.zeros(256, dtype=torch.int64) for _ in range(acc.n)]
    masked_bins = [torch.zeros(256, dtype=torch.int64) for _ in range(acc.n)]
    buf = None
    for a in range(0, job.rows, step):
        b = min(a + step, job.rows)
        if buf is None or buf.shape[1] != b - a:
            buf = torch.empty(len(views), b - a, job.row_numel, dtype=torch.float32)
        for i, v in enumerate(views):
            buf[i].copy_(v[a:b])  # widening copy: exact
            stats.bytes_read += v[a:b].numel() * v.element_size()
        if check_finite and not bool(buf.sum().isfinite()) and not bool(torch.isfinite(buf).all()):
            bad = [pt.sources[i][0] for i in range(len(views)) if not bool(torch.isfinite(buf[i]).all())]
            raise MergeError(f"tensor '{pt.name}': non-finite values in model(s) {bad}; pass allow_nonfinite=True "
                             "(--allow-nonfinite) to build masks anyway")
        d = merge.decompose(Chunk(a, b, buf))
        bits.add(d.masks.reshape(acc.n, -1))
        if acc.emr:
            for t in range(acc.n):
                tau_bins[t] += abs_sum_bins(d.tau[t])
                masked_bins[t] += abs_sum_bins(d.shared, d.masks[t])
    bits.close()
    acc.elements += job.numel
    acc.ones = [x + y for x, y in zip(acc.ones, bits.ones)]
    if acc.emr:
        # EMR's rescaler sums per-tensor means, so every tensor counts equally whatever its size
        for t in range(acc.n):
            acc.tau_means[t] += _bins_mean(tau_bins[t], job.numel)
            acc.masked_means[t] += _bins_mean(masked_bins[t], job.numel)


def _rescalers(plan: Plan, method: str, acc: _Accumulator, tasks: list[str]) -> list[float]:
    if method == "tall_masks":
        return [1.0] * len(tasks)
    if method == "mmer":
        lams = {float(pt.job.params["lambda"]) for pt in plan.tensors}
        if len(lams) != 1:
            raise ConfigError(f"mmer: 'lambda' is one scale per modality model, the same for every tensor; got "
                              f"{sorted(lams)}")
        return [lams.pop()] * len(tasks)
    # EMR: lambda_t = sum mean|tau_t| / sum mean|M_t tau_uni|; a task whose masks are all off rebuilds the
    # base whatever its rescaler, so 0/0 gives 1 rather than NaN
    return [a / b if b > 0 else 1.0 for a, b in zip(acc.tau_means, acc.masked_means)]


# ------------------------------------------------------------------------------------------------- applying


class _Source:
    """Tensors by name from a checkpoint path or an in-memory state dict."""

    def __init__(self, src: str | Path | Mapping[str, torch.Tensor] | Checkpoint, what: str, allow_pickle: bool):
        self.what = what
        self._owned: Checkpoint | None = None
        if isinstance(src, Mapping):
            self.state, self.ck, self.label = src, None, f"the {what} state dict"
        else:
            self.ck = src if isinstance(src, Checkpoint) else Checkpoint.open(src, allow_pickle=allow_pickle)
            self._owned = None if isinstance(src, Checkpoint) else self.ck
            self.state, self.label = None, f"{what} {self.ck.path}"

    def names(self) -> list[str]:
        return list(self.state) if self.state is not None else self.ck.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape) if self.state is not None else tuple(self.ck.info(name).shape)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name] if self.state is not None else self.ck.tensor(name)

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


def _check_model(masks: PackedMasks, src: _Source, *, exact: bool) -> None:
    """MergeError unless ``src`` holds every masked tensor with its shape (and, if ``exact``, nothing else)."""
    have = set(src.names())
    missing = [n for n in masks.shapes if n not in have]
    extra = sorted(have - set(masks.shapes)) if exact else []
    if missing or extra:
        raise MergeError(f"masks file {masks.path} does not belong to {src.label}: "
                         + (f"{len(missing)} masked tensor(s) missing (first: '{missing[0]}')" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"{len(extra)} tensor(s) without masks (first: '{extra[0]}')" if extra else ""))
    for name, shape in masks.shapes.items():
        got = src.shape(name)
        if got != shape:
            raise MergeError(f"masks file {masks.path} does not belong to {src.label}: tensor '{name}' has shape "
                             f"{list(got)} there, the masks were built for {list(shape)}")


def iter_task_model(merged: str | Path | Mapping[str, torch.Tensor], masks_path: str | Path, task: str | int, *,
                    base: str | Path | Mapping[str, torch.Tensor] | None = None,
                    allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of task ``task``'s model, one tensor at a time: theta_0 + r_t m_t (merged - theta_0), in the
    merged tensor's dtype. Validates that merged and base match the masks before yielding anything."""
    masks = PackedMasks(masks_path)
    t = masks.task_index(task)
    base_ref = base if base is not None else masks.base_model
    if base_ref is None:
        raise MergeError(f"masks file {masks.path} records no base model; pass base=")
    msrc = _Source(merged, "merged model", allow_pickle)
    try:
        bsrc = _Source(base_ref, "base model", allow_pickle)
    except BaseException:
        msrc.close()
        raise
    try:
        _check_model(masks, msrc, exact=True)
        _check_model(masks, bsrc, exact=False)
        r = torch.tensor(masks.rescalers[t], dtype=torch.float32)
        for name in masks.shapes:
            merged_t = msrc.get(name)
            theta0 = bsrc.get(name).to(torch.float32)
            m = masks.mask(name, t)
            # (tau * m) * r, then + base: the references' order of operations
            out = theta0 + ((merged_t.to(torch.float32) - theta0) * m) * r
            yield name, out.to(merged_t.dtype)
    finally:
        msrc.close()
        bsrc.close()
        masks.close()


def apply_task_mask(merged_dir_or_state: str | Path | Mapping[str, torch.Tensor], masks_path: str | Path,
                    task: str | int, *, base: str | Path | Mapping[str, torch.Tensor] | None = None,
                    allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """State dict of task ``task``'s model rebuilt from the merged model and the packed masks (see
    ``iter_task_model``); ``task`` is a task label, its last path component, or a position."""
    return {name: t.clone() for name, t in iter_task_model(merged_dir_or_state, masks_path, task, base=base,
                                                           allow_pickle=allow_pickle)}


def write_task_model(merged_dir: str | Path, masks_path: str | Path, task: str | int, out_dir: str | Path, *,
                     base: str | Path | None = None, overwrite: bool = False, out_shard_size: str | int = "5GB",
                     allow_pickle: bool = False) -> Path:
    """Write task ``task``'s model into ``out_dir`` (safetensors shards + the merged dir's config and tokenizer
    files), streaming one tensor at a time; the directory appears complete or not at all."""
    from .io.atomic_dir import AtomicOutputDir
    from .io.output_extras import TOKENIZER_FILES
    from .io.safetensors_format import TORCH_TO_ST
    from .io.safetensors_writer import ShardedWriter, plan_shards

    merged_dir = Path(merged_dir)
    with Checkpoint.open(merged_dir, allow_pickle=allow_pickle) as ck:
        layout = [(n, TORCH_TO_ST[ck.info(n).torch_dtype], tuple(ck.info(n).shape)) for n in ck.names()]
        shards = plan_shards(layout, parse_size(out_shard_size, "out_shard_size"))
        out = AtomicOutputDir(out_dir, overwrite=overwrite)
        try:
            with ShardedWriter(out.path, shards) as writer:
                for name, tensor in iter_task_model(ck, masks_path, task, base=base, allow_pickle=allow_pickle):
                    writer.write(name, tensor.contiguous())
            writer.write_index()
            src_dir = ck.path
            for f in ("config.json", *TOKENIZER_FILES):
                if (src_dir / f).is_file():
                    (out.path / f).write_bytes((src_dir / f).read_bytes())
            return out.commit()
        except BaseException:
            out.abort()
            raise


__all__ = ["MASK_METHODS", "MasksReport", "build_task_masks", "apply_task_mask", "iter_task_model",
           "write_task_model"]
