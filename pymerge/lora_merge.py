"""Low-rank output for adapter merges: merge, then write a rank-R PEFT adapter of (merged - base).

The combine-then-SVD path. A merge of LoRA adapters (or of any models) is run as usual into a temporary
directory beside the output, in float32 whatever the config's dtype (rounding merged weights to bf16 would
bury the difference from the base under the rounding of the weights themselves), and ``extract_lora`` then
writes ``U·√S`` / ``√S·Vh`` of each changed module's rank-R truncated SVD (the streamed randomized SVD) as a
PEFT adapter. The temporary merge is removed whatever happens; the adapter directory appears atomically.

Which modules: with adapter inputs, the union of the modules the adapters change (a merge only changes
those); otherwise the extraction's default (every linear weight of the transformer blocks), or ``modules``.
Memory is that of the merge plus one tensor's SVD state; the temporary merge needs disk for one float32 copy
of the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from .config import MergeConfig, load_config
from .errors import ConfigError
from .lora_extract import ExtractReport, extract_lora
from .plan import is_pre_weight, split_layer_name


def merge_to_lora(config_or_path: MergeConfig | str | Path | dict, out_dir: str | Path, *, rank: int,
                  modules: Sequence[str] | None = None, seed: int = 0, max_memory: str | int | None = None,
                  backend: str = "auto", dtype: str = "float32", overwrite: bool = False, quiet: bool = False,
                  allow_pickle: bool = False, allow_nonfinite: bool = False) -> ExtractReport:
    """Merge the config's models and write a rank-``rank`` PEFT adapter of (merged - base) to ``out_dir``."""
    from .api import merge
    from .io.lora import LoraCheckpoint
    from .plan import build_plan

    config = config_or_path if isinstance(config_or_path, MergeConfig) else load_config(config_or_path)
    if not config.base_model:
        raise ConfigError("a low-rank (adapter) output needs base_model: the adapter is the difference from it")
    plan = build_plan(config, seed=seed, allow_pickle=allow_pickle)
    try:
        base_dir = Path(plan.checkpoints[config.base_model].path)
        changed = {name for ck in plan.checkpoints.values() if isinstance(ck, LoraCheckpoint)
                   for name in ck.lora_names()}
    finally:
        plan.close()
    if modules is None and changed:
        modules = sorted({n[: -len(".weight")] if n.endswith(".weight") else n for n in changed})
    # the extraction takes embeddings only when asked (PEFT stores them transposed, as lora_embedding_A/B)
    embeddings = any(split_layer_name(m + ".weight") is None and is_pre_weight(m + ".weight") for m in modules or ())
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.pymerge-lora-merge"
    try:
        merged = merge(config.model_copy(update={"out_dtype": "float32"}), tmp, seed=seed, max_memory=max_memory,
                       backend=backend, quiet=quiet, overwrite=True, restart=True, allow_pickle=allow_pickle,
                       allow_nonfinite=allow_nonfinite)
        return extract_lora(base_dir, merged.out_dir, out_dir, rank=rank, modules=modules,
                            include_embeddings=embeddings, dtype=dtype, seed=seed, overwrite=overwrite,
                            allow_pickle=allow_pickle, progress=not quiet)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
