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
from .io.output_extras import copy_tokenizer_files, write_config_json, write_model_card
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
        (out / "chat_template.jinja").write_text(plan.config.chat_template)
    config_yaml = plan.config.to_yaml()
    (out / "pymerge_config.yml").write_text(config_yaml)
    inputs = [m for m in plan.config.referenced_models()]
    write_model_card(out, method=plan.config.merge_method, models=inputs, base_model=plan.config.base_model,
                     config_yaml=config_yaml)


def merge(config_or_path: MergeConfig | str | Path | dict, out_dir: str | Path, *, device: str = "auto",
          backend: str = "auto", max_memory: str | int | None = None, max_gpu_memory: str | int | None = None,
          out_shard_size: str | int = "5GB", seed: int = 0, quiet: bool = False, overwrite: bool = False,
          allow_pickle: bool = False) -> MergeReport:
    """Merge the models a mergekit-style config names into ``out_dir`` and return a ``MergeReport``.

    Every input header is validated before any weight is read; the output is written into a temporary
    directory beside ``out_dir`` and renamed into place only when complete, so a failed merge leaves nothing.
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
        out = AtomicOutputDir(out_dir, overwrite=overwrite)
        try:
            writer = ShardedWriter(out.path, plan.shards)
            stats = execute(plan, writer, max_memory=budget, progress=not quiet)
            writer.close()
            writer.write_index()
            _write_extras(plan, out.path)
            final = out.commit()
        except BaseException:
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
