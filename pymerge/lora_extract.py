"""Extract a PEFT LoRA adapter from a fine-tune: truncated SVD of each weight's task vector.

For every targeted 2-D weight, with ΔW = finetuned − base (fp32 differences of the stored weights) and its
rank-r truncated SVD ΔW ≈ U diag(S) Vh (streamed randomized SVD, ``pymerge.ops.randomized_svd``):

    lora_A = diag(√S) Vh   [r, in]        lora_B = U diag(√S)   [out, r]        lora_alpha = r  (s = 1)

so that PEFT's merge W + (alpha / r) · B @ A gives back base + U S Vh, the best rank-r approximation of the
fine-tune (Eckart–Young) up to the randomized range finder's error. Embeddings use PEFT's transposed layout:
lora_embedding_A = diag(√S) Uᵀ [r, vocab], lora_embedding_B = Vhᵀ diag(√S) [dim, r].

Weights are read zero-copy and streamed in row blocks (6 passes each with the default 2 power iterations);
the factors of the whole adapter are held in memory until written (r · (in + out) values per module).
Layouts assume ``nn.Linear`` ([out, in]); GPT-2-style Conv1D checkpoints are refused.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigError
from .io.atomic_dir import AtomicOutputDir
from .io.checkpoint import Checkpoint
from .io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .ops.randomized_svd import DifferenceRowBlocks, randomized_svd
from .plan import is_pre_weight, split_layer_name

log = logging.getLogger("pymerge")

_PREFIX = "base_model.model."
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "decision_transformer")  # HF models built on Conv1D ([in, out])
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExtractReport:
    """What ``extract_lora`` wrote."""

    out_dir: str
    rank: int
    modules: list[str]  # module names (tensor name without ".weight") that got a LoRA
    embeddings: list[str] = field(default_factory=list)  # those among them stored as lora_embedding_A/B
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class _Target:
    name: str  # weight tensor name
    module: str
    embedding: bool


def select_targets(base: Checkpoint, finetuned: Checkpoint, *, modules: Sequence[str] | None = None,
                   include_embeddings: bool = False) -> list[_Target]:
    """The weights to extract, in the base's order.

    Default: every 2-D ``*.weight`` inside the transformer blocks (names with a ``layers.<i>.`` component).
    ``modules``: module names matched like PEFT's target_modules (equal to, or ending in ``.<module>``), any
    2-D weight, in or out of the blocks. ``include_embeddings`` adds the embedding matrices (names containing
    ``embed``/``wte``/``wpe``).
    """
    out = []
    for name in base.names():
        if not name.endswith(".weight") or len(base.info(name).shape) != 2:
            continue
        module = name[: -len(".weight")]
        embedding = split_layer_name(name) is None and is_pre_weight(name)
        if embedding:
            chosen = include_embeddings
        elif modules:
            chosen = any(module == m or module.endswith("." + m) for m in modules)
        else:
            chosen = split_layer_name(name) is not None
        if not chosen:
            continue
        if name not in finetuned:
            raise CheckpointError(f"fine-tuned checkpoint {finetuned.path} has no tensor {name!r} (in the base)")
        fs, bs = tuple(finetuned.info(name).shape), tuple(base.info(name).shape)
        if fs != bs:
            raise CheckpointError(f"tensor {name!r}: fine-tuned shape {list(fs)} differs from base shape {list(bs)} "
                                  f"({finetuned.path} vs {base.path})")
        out.append(_Target(name, module, embedding))
    if modules:
        for m in modules:
            if not any(t.module == m or t.module.endswith("." + m) for t in out):
                raise ConfigError(f"--modules: no 2-D weight of {base.path} matches module {m!r}")
    if not out:
        raise ConfigError(f"no weights to extract in {base.path} (no 2-D weights in transformer blocks; choose "
                          "some with --modules)")
    return out


def _check_not_conv1d(base: Checkpoint) -> None:
    if base.config_path is None:
        return
    try:
        model_type = json.loads(base.config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    if model_type in _CONV1D_MODEL_TYPES:
        raise ConfigError(f"{base.config_path}: model_type {model_type!r} stores its linear layers as Conv1D "
                          "([in, out]); LoRA extraction supports nn.Linear layouts only")


def extract_lora(base: str | Path, finetuned: str | Path, out_dir: str | Path, *, rank: int,
                 modules: Sequence[str] | None = None, include_embeddings: bool = False, dtype: str = "float32",
                 oversample: int = 10, power_iters: int = 2, seed: int = 0, overwrite: bool = False,
                 allow_pickle: bool = False, progress: bool = True) -> ExtractReport:
    """Write a rank-``rank`` PEFT LoRA adapter approximating ``finetuned − base`` to ``out_dir`` (atomically)."""
    t0 = time.perf_counter()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--rank must be a positive integer, got {rank!r}")
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out_dtype = _DTYPES[dtype]
    with Checkpoint.open(base, allow_pickle=allow_pickle) as b, Checkpoint.open(finetuned,
                                                                                 allow_pickle=allow_pickle) as f:
        _check_not_conv1d(b)
        targets = select_targets(b, f, modules=modules, include_embeddings=include_embeddings)
        for t in targets:  # every rank problem before any work
            shape = b.info(t.name).shape
            if rank > min(shape):
                raise ConfigError(f"--rank {rank} is larger than min(out, in) = {min(shape)} of tensor {t.name!r} "
                                  f"(shape {list(shape)}); choose a rank <= {min(shape)} or leave it out with "
                                  "--modules")
        tensors: dict[str, torch.Tensor] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(targets), unit="tensor", desc="extracting LoRA", dynamic_ncols=True, leave=False)
        try:
            for t in targets:
                a, bb = _factors(f.tensor(t.name), b.tensor(t.name), rank, oversample, power_iters, seed)
                key = _PREFIX + t.module
                if t.embedding:  # PEFT stores ΔW [vocab, dim] as (B @ A)ᵀ: A [r, vocab], B [dim, r]
                    tensors[key + ".lora_embedding_A"] = bb.T.contiguous().to(out_dtype)
                    tensors[key + ".lora_embedding_B"] = a.T.contiguous().to(out_dtype)
                else:
                    tensors[key + ".lora_A.weight"] = a.to(out_dtype)
                    tensors[key + ".lora_B.weight"] = bb.to(out_dtype)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        config = _adapter_config(b.path, targets, rank)

    out = AtomicOutputDir(out_dir, overwrite=overwrite)
    try:
        save_file(tensors, str(out.path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (out.path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        written = sum(p.stat().st_size for p in out.path.iterdir())
        final = out.commit()
    finally:
        out.abort()
    return ExtractReport(out_dir=str(final), rank=rank, modules=[t.module for t in targets],
                         embeddings=[t.module for t in targets if t.embedding], bytes_written=written,
                         seconds=time.perf_counter() - t0)


def _factors(finetuned: torch.Tensor, base: torch.Tensor, rank: int, oversample: int, power_iters: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A = √S·Vh [r, in], B = U·√S [out, r]) of the rank-r truncated SVD of finetuned − base (fp32)."""
    u, s, vh = randomized_svd(DifferenceRowBlocks(finetuned, base), rank, oversample=oversample,
                              power_iters=power_iters, seed=seed)
    root = s.clamp_min(0).sqrt()  # splitting S evenly keeps A and B on the same scale (bf16/fp16 safe)
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def _adapter_config(base_path: Path, targets: list[_Target], rank: int) -> dict:
    """PEFT LoraConfig fields of the extracted adapter: lora_alpha = r so that s = alpha / r = 1."""
    leaves = sorted({t.module.rsplit(".", 1)[-1] for t in targets})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_path),
        "r": rank,
        "lora_alpha": rank,
        "target_modules": leaves,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }


def parse_modules(value: str | None) -> list[str] | None:
    """``q_proj,v_proj`` -> ["q_proj", "v_proj"]; None/empty -> None (the default selection)."""
    if not value:
        return None
    mods = [m.strip() for m in value.split(",") if m.strip()]
    for m in mods:
        if not re.fullmatch(r"[A-Za-z0-9_.]+", m):
            raise ConfigError(f"--modules: {m!r} is not a module name (letters, digits, '_' and '.')")
    return mods or None
