"""``pymerge.merge``: config -> plan -> execute -> a complete output directory, atomically."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import MergeConfig, load_config
from .executor import execute
from .io.atomic_dir import AtomicOutputDir
from .io.disk_space import DISK_ERRNOS, GuardedWriter, check_free_space, disk_error, planned_bytes
from .io.manifest import VerifyReport, verify_output, write_manifest
from .io.output_extras import TOKENIZER_FILES, copy_tokenizer_files, write_config_json, write_model_card
from .io.safetensors_writer import ShardedWriter
from .ops.backend import resolve_backend, resolve_device
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
          allow_pickle: bool = False, allow_nonfinite: bool = False, check_space: bool = True) -> MergeReport:
    """Merge the models a mergekit-style config names into ``out_dir`` and return a ``MergeReport``.

    Every input header is validated before any weight is read; the output is written into a temporary
    directory beside ``out_dir`` and renamed into place only when complete, so a failed merge leaves nothing.
    A NaN/Inf in any input is a MergeError unless ``allow_nonfinite``; a filesystem without room for the
    output is refused before writing unless ``check_space`` is False. The output ends with
    ``pymerge_manifest.json`` (sizes and sha256 of every file) for ``verify``.
    """
    t0 = time.perf_counter()
    config = config_or_path if isinstance(config_or_path, MergeConfig) else load_config(config_or_path)
    dev = resolve_device(device)
    chosen = resolve_backend(backend, config.merge_method, dev)
    budget = parse_size(max_memory, "max_memory") if max_memory is not None else default_max_memory()
    if max_gpu_memory is not None:
        parse_size(max_gpu_memory, "max_gpu_memory")  # validated; used by the GPU executor
    shard_bytes = parse_size(out_shard_size, "out_shard_size")
    plan = build_plan(config, seed=seed, out_shard_size=shard_bytes, allow_pickle=allow_pickle)
    try:
        log.info("merging %d tensors with %s (%s backend), budget %.2f GB", len(plan.tensors),
                 config.merge_method, chosen, budget / 1e9)
        if check_space:
            check_free_space(out_dir, planned_bytes(plan.shards, _tokenizer_sources(plan)))
        out = AtomicOutputDir(out_dir, overwrite=overwrite)
        writer: GuardedWriter | None = None
        try:
            writer = GuardedWriter(ShardedWriter(out.path, plan.shards), shown_dir=out.final)
            stats = execute(plan, writer, max_memory=budget, progress=not quiet,  # type: ignore[arg-type]
                            allow_nonfinite=allow_nonfinite)
            writer.close()
            writer.writer.write_index()
            _write_extras(plan, out.path)
            write_manifest(out.path, plan.shards, pymerge_version=_version())
            final = out.commit()
        except OSError as e:
            if writer is not None:
                writer.abort()
            out.abort()
            if e.errno not in DISK_ERRNOS:
                raise
            # Shard writes were already reported by GuardedWriter; this is the index, extras or manifest.
            left = writer.remaining if writer else sum(sh.file_size for sh in plan.shards)
            raise disk_error(e, _shown_path(e.filename, out), left) from e
        except BaseException:
            if writer is not None:
                writer.abort()  # close the shard files before the directory goes
            out.abort()
            raise
    finally:
        plan.close()
    report = MergeReport(out_dir=str(final), method=config.merge_method, backend=chosen, device=dev,
                         tensors=stats.tensors, shards=len(plan.shards), bytes_read=stats.bytes_read,
                         bytes_written=stats.bytes_written, seconds=time.perf_counter() - t0, max_memory=budget,
                         chunked_tensors=stats.chunked_tensors)
    log.info("wrote %s: %d tensors, %.2f GB in %.2f s", final, report.tensors, report.bytes_written / 1e9,
             report.seconds)
    return report


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
