"""``pymerge.merge``: config -> plan -> execute -> a complete output directory, atomically."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import MergeConfig, load_config
from .errors import MergeError
from .executor import ExecStats, execute
from .io.atomic_dir import AtomicOutputDir, ResumableOutputDir, partial_bytes
from .io.disk_space import DISK_ERRNOS, GuardedWriter, check_free_space, disk_error, planned_bytes
from .io.fingerprint import run_fingerprint
from .io.journal import Journal, JournalEntry, TensorCommitter, fault_after_from_env, read_journal, verify_entries
from .io.manifest import VerifyReport, verify_output, write_manifest
from .io.output_extras import TOKENIZER_FILES, copy_tokenizer_files, write_config_json, write_model_card
from .io.safetensors_writer import ShardedWriter
from .ops.backend import requested_backend, resolve_backend, resolve_device
from .plan import Plan, build_plan
from .sizes import default_max_memory, parse_size

log = logging.getLogger("pymerge")

_DTYPE_NAMES = {"torch.float32": "float32", "torch.float16": "float16", "torch.bfloat16": "bfloat16",
                "torch.float64": "float64"}


@dataclass
class MergeReport:
    """What a merge did: where, how much, how fast."""

    out_dir: str
    method: str
    backend: str
    device: str
    tensors: int
    shards: int
    bytes_read: int
    bytes_written: int
    seconds: float
    max_memory: int
    chunked_tensors: int
    resumed_tensors: int = 0  # tensors kept from an interrupted run (counted in ``tensors``)

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / max(self.seconds, 1e-9) / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gb_per_s"] = self.gb_per_s
        return d


def _write_extras(plan: Plan, out: Path) -> None:
    cks = plan.checkpoints
    dtypes = {_DTYPE_NAMES[str(t.out_dtype)] for t in plan.tensors}
    out_dtype = dtypes.pop() if len(dtypes) == 1 else _DTYPE_NAMES[str(plan.tensors[0].out_dtype)]
    write_config_json(cks[plan.reference_model].config_path, out, out_dtype)
    cfg_path = out / "config.json"
    if plan.num_layers is not None and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if "num_hidden_layers" in cfg and cfg["num_hidden_layers"] != plan.num_layers:
            cfg["num_hidden_layers"] = plan.num_layers  # slices change the depth
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if plan.tokenizer_model is not None:
        copied = copy_tokenizer_files(cks[plan.tokenizer_model].path, out)
        log.debug("copied tokenizer files %s from %s", copied, plan.tokenizer_model)
    if plan.config.chat_template:
        (out / "chat_template.jinja").write_text(plan.config.chat_template_text())
    config_yaml = plan.config.to_yaml()
    (out / "pymerge_config.yml").write_text(config_yaml)
    inputs = [m for m in plan.config.referenced_models()]
    write_model_card(out, method=plan.config.merge_method, models=inputs, base_model=plan.config.base_model,
                     config_yaml=config_yaml)


def _tokenizer_sources(plan: Plan) -> list[Path]:
    """The tokenizer files the output will get a copy of (for the free-space estimate)."""
    if plan.tokenizer_model is None:
        return []
    src = plan.checkpoints[plan.tokenizer_model].path
    return [src / f for f in TOKENIZER_FILES if (src / f).is_file()]


def merge(config_or_path: MergeConfig | str | Path | dict, out_dir: str | Path, *, device: str = "auto",
          backend: str = "auto", max_memory: str | int | None = None, max_gpu_memory: str | int | None = None,
          out_shard_size: str | int = "5GB", seed: int = 0, quiet: bool = False, overwrite: bool = False,
          allow_pickle: bool = False, allow_nonfinite: bool = False, check_space: bool = True,
          restart: bool = False) -> MergeReport:
    """Merge the models a mergekit-style config names into ``out_dir`` and return a ``MergeReport``.

    Every input header is validated before any weight is read; the output is written into
    ``.<name>.pymerge-partial/`` beside ``out_dir`` and renamed into place only when complete. A merge that
    is interrupted (Ctrl-C, a kill, a crash, a full disk) leaves that partial directory behind, and calling
    ``merge`` again with the same arguments continues it: tensors recorded in its journal whose bytes still
    check out are kept, the rest are merged, and the result is byte-identical to an uninterrupted run. A
    partial run of a different merge (config, seed, inputs, layout or version differ) is refused with a
    MergeError; ``restart`` discards any partial run first. Other errors remove the partial directory.
    A NaN/Inf in any input is a MergeError unless ``allow_nonfinite``; a filesystem without room for the
    output is refused before writing unless ``check_space`` is False. The output ends with
    ``pymerge_manifest.json`` (sizes and sha256 of every file, shards hashed per tensor) for ``verify``.
    """
    t0 = time.perf_counter()
    config = config_or_path if isinstance(config_or_path, MergeConfig) else load_config(config_or_path)
    dev = resolve_device(device)
    chosen = resolve_backend(backend, config.merge_method, dev)
    budget = parse_size(max_memory, "max_memory") if max_memory is not None else default_max_memory()
    gpu_budget = parse_size(max_gpu_memory, "max_gpu_memory") if max_gpu_memory is not None else None
    shard_bytes = parse_size(out_shard_size, "out_shard_size")
    plan = build_plan(config, seed=seed, out_shard_size=shard_bytes, allow_pickle=allow_pickle)
    plan.backend, plan.backend_explicit = chosen, requested_backend(backend) != "auto"
    try:
        log.info("merging %d tensors with %s (%s backend), budget %.2f GB", len(plan.tensors),
                 config.merge_method, chosen, budget / 1e9)
        if check_space:
            reusable = 0 if restart else partial_bytes(out_dir)  # a resumed run rewrites its shards in place
            check_free_space(out_dir, planned_bytes(plan.shards, _tokenizer_sources(plan)) - reusable)
        out = ResumableOutputDir(out_dir, fingerprint=_fingerprint(plan, seed), overwrite=overwrite,
                                 restart=restart)
        gpu = _gpu_engine(chosen, gpu_budget) if dev == "cuda" else None
        stats, resumed, final = _run_in(out, plan, budget, quiet=quiet, allow_nonfinite=allow_nonfinite, gpu=gpu)
    finally:
        plan.close()
    report = MergeReport(out_dir=str(final), method=config.merge_method, backend=chosen, device=dev,
                         tensors=stats.tensors + resumed, shards=len(plan.shards), bytes_read=stats.bytes_read,
                         bytes_written=stats.bytes_written, seconds=time.perf_counter() - t0, max_memory=budget,
                         chunked_tensors=stats.chunked_tensors, resumed_tensors=resumed)
    log.info("wrote %s: %d tensors (%d resumed), %.2f GB in %.2f s", final, report.tensors, resumed,
             report.bytes_written / 1e9, report.seconds)
    return report


def _fingerprint(plan: Plan, seed: int) -> dict[str, str]:
    files = [f for label in sorted(plan.checkpoints) for f in plan.checkpoints[label].files()]
    return run_fingerprint(config_yaml=plan.config.to_yaml(), seed=seed, input_files=files, shards=plan.shards,
                           pymerge_version=_version())


def _resume_point(out: ResumableOutputDir, plan: Plan) -> dict[str, JournalEntry]:
    """The journal entries, by tensor name, of the tensors an interrupted run already wrote whose bytes still
    match their checksum."""
    if not out.resumed:
        return {}
    entries = read_journal(out.journal_path)
    good, bad = verify_entries(out.path, plan.shards, entries)
    done = {n: entries[n] for n in good & {t.name for t in plan.tensors}}
    log.info("resuming %s: %d of %d tensors already written and verified%s", out.final, len(done),
             len(plan.tensors), f", {len(bad)} failed their checksum and are merged again" if bad else "")
    if bad:
        log.warning("resume: merging again %d tensor(s) whose bytes no longer match the journal: %s", len(bad),
                    ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    return done


def _gpu_engine(kernels: str, gpu_budget: int | None) -> tuple:
    """(streaming executor on the current CUDA device, kernel set): the budget is ``--max-gpu-memory``, by
    default 90% of the device memory free now (a first guess, not yet measured on a GPU: the rest is left for
    the CUDA context and the allocator's slack)."""
    import torch

    from .gpu.kernels import get_kernels
    from .gpu.streaming import StreamingExecutor

    if gpu_budget is None:
        gpu_budget = int(torch.cuda.mem_get_info()[0] * 0.9)
    return StreamingExecutor("cuda", gpu_budget), get_kernels(kernels)


def _run_in(out: ResumableOutputDir, plan: Plan, budget: int, *, quiet: bool,
            allow_nonfinite: bool, gpu: tuple | None = None) -> tuple[ExecStats, int, Path]:
    """Merge into the partial directory ``out`` (continuing it if it was resumed) and commit it.

    An interruption or a full/failing disk keeps the partial directory for the next run; any other error
    removes it (it would recur: a bad input, a bug).
    """
    writer: GuardedWriter | None = None
    committer: TensorCommitter | None = None
    try:
        resumed = _resume_point(out, plan)
        done = set(resumed)
        sharded = ShardedWriter(out.path, plan.shards, resume=out.resumed)
        writer = GuardedWriter(sharded, shown_dir=out.final)
        for name in done:
            sharded.mark_written(name)
        writer.written += sum(pt.out_bytes for pt in plan.tensors if pt.name in done)
        committer = TensorCommitter(out.path, plan.shards, Journal(out.journal_path),
                                    fault_after=fault_after_from_env(), resumed=resumed, digests=sharded.digest)
        stats = execute(plan, writer, max_memory=budget, progress=not quiet,  # type: ignore[arg-type]
                        allow_nonfinite=allow_nonfinite, skip=done, on_tensor_done=committer.tensor_done, gpu=gpu)
        committer.close()  # every merged tensor journaled: a crash from here on loses no tensor
        writer.close()
        writer.writer.write_index()
        _write_extras(plan, out.path)
        # The journal already has every tensor's sha256 (hashed as written): the manifest reuses those hashes,
        # so only the headers and the small files are read again here.
        write_manifest(out.path, plan.shards, pymerge_version=_version(), tensor_hashes=committer.entries())
        return stats, len(done), out.commit()
    except BaseException as e:
        keep = _resumable(e)
        if committer is not None:
            committer.close(raise_errors=False)  # journal what is finished, so the next run keeps it
        if writer is not None:
            writer.abort()  # close the shard files before the directory goes (or stays)
        if not keep:
            out.abort()
            raise
        out.keep()
        hint = (f"; the partial merge is kept in {out.root}: free some space and run the same command again "
                "to resume")
        if isinstance(e, OSError):
            left = writer.remaining if writer else sum(sh.file_size for sh in plan.shards)
            raise MergeError(str(disk_error(e, _shown_path(e.filename, out), left)) + hint) from e
        if isinstance(e, MergeError):
            raise MergeError(str(e) + hint) from e.__cause__
        raise


def _resumable(e: BaseException) -> bool:
    """Whether a merge stopped by ``e`` should leave its partial directory for the next run to continue."""
    if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
        return True
    if isinstance(e, OSError):
        return e.errno in DISK_ERRNOS
    # GuardedWriter reports a full disk as a MergeError caused by the OSError
    cause = e.__cause__
    return isinstance(e, MergeError) and isinstance(cause, OSError) and cause.errno in DISK_ERRNOS


def _shown_path(filename: object, out: AtomicOutputDir) -> Path:
    """The path to name in an error: a file of the temporary directory under its final name."""
    if not isinstance(filename, (str, Path)):
        return out.final
    p = Path(filename)
    return out.final / p.relative_to(out.path) if p.is_relative_to(out.path) else p


def verify(out_dir: str | Path) -> VerifyReport:
    """Check a merged output against its ``pymerge_manifest.json`` and return what was checked.

    Every listed file must exist with its recorded size and sha256, no unlisted ``.safetensors`` file may be
    present, every shard must pass the validating reader with exactly the listed tensors, and the index (if
    any) must match the shards and their total size. Raises CheckpointError naming the first problem.
    """
    return verify_output(out_dir)


def _version() -> str:
    from . import __version__

    return __version__
