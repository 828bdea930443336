"""A PEFT LoRA adapter presented as a checkpoint: every tensor of base + ΔW, computed lazily per tensor.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For each targeted
module it stores ``lora_A`` [r, in] and ``lora_B`` [out, r]; the merged weight is

    W' = W + s · B @ A,     s = lora_alpha / r   (or lora_alpha / √r with ``use_rslora``)

with ``r`` and ``lora_alpha`` overridden per module by ``rank_pattern`` / ``alpha_pattern`` (first pattern
``p`` with ``re.match(rf"(.*\\.)?({p})$", module)``, PEFT's rule). Layout variants, as PEFT merges them:
- ``fan_in_fan_out`` (GPT-2 Conv1D stores W as [in, out]): ΔW is transposed, (B @ A)ᵀ;
- embeddings store ``lora_embedding_A`` [r, vocab] and ``lora_embedding_B`` [dim, r]: ΔW = (B @ A)ᵀ;
- ``lora_B.bias`` (``lora_bias``): the module's bias gets + s · b;
- any other stored tensor (``modules_to_save``, ``bias: all``, a saved ``base_layer`` such as a resized
  embedding) replaces the base's tensor of that name before ΔW is added.
Tensors the adapter does not touch are the base's own, zero-copy. Touched tensors are computed in
fp32 (fp64 when the base or adapter is fp64) and presented in that dtype, so ΔW is never rounded into a
bf16 base before the merge sees it.

Adapters PEFT cannot merge into plain weights, or that we cannot reproduce from the files, are refused with
a CheckpointError: DoRA and the other LoRA variants, aLoRA, LoRA on convolutions or raw parameters, layer
replication, trainable tokens, and adapters initialised from a modified base (PiSSA, OLoRA, CorDA, LoftQ...).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from pymerge.errors import CheckpointError
from pymerge.io.checkpoint import Checkpoint
from pymerge.io.safetensors_format import MAX_HEADER_BYTES, TORCH_TO_ST, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_FLOAT_ST = ("F64", "F32", "F16", "BF16")

# Config keys that switch on something other than W + s·B@A (value truthy/non-null -> refused), with why.
_REFUSED_KEYS = {
    "use_dora": "DoRA (use_dora: true) is not supported yet: its merged weight rescales every column by a "
                "learned magnitude, which is not W + s·B@A",
    "alora_invocation_tokens": "aLoRA applies its weights only after the invocation tokens, so it cannot be "
                               "merged into plain weights",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "BD-LoRA (use_bdlora) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) mixes adapters per token and cannot be merged into weights",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "layer_replication": "layer_replication changes the model's layer structure; it is not supported",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "megatron_config": "Megatron-parallel LoRA (megatron_config) is not supported",
}
# init_lora_weights values that train against a modified base that the adapter files do not hold.
_MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def split_lora_reference(ref: str) -> tuple[str, str] | None:
    """(base, adapter) for mergekit's ``base+adapter`` model reference, None for a plain reference."""
    parts = ref.split("+")
    if len(parts) == 1:
        return None
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise CheckpointError(f"model reference '{ref}': expected 'base+adapter' (exactly one '+')")
    return parts[0], parts[1]


def open_lora_reference(ref: str, base_ref: str | None, candidates: Callable[[str], list[Path]], *,
                        allow_pickle: bool = False) -> LoraCheckpoint | None:
    """The adapter-backed checkpoint model reference ``ref`` names, or None when it is a plain checkpoint.

    ``ref`` is an adapter when it is ``base+adapter`` or when it resolves to an adapter directory; the base is
    then the part before '+', else ``base_ref`` (the config's base_model). ``candidates(r)`` lists where a
    reference may live, first existing one wins (the planner's lookup rule).
    """
    split = split_lora_reference(ref) if not any(p.exists() for p in candidates(ref)) else None
    if split is not None:
        base_part, adapter_part = split
        adapter_dir = _locate(adapter_part, candidates, f"adapter of '{ref}'")
        if not is_adapter_dir(adapter_dir):
            raise CheckpointError(f"model reference '{ref}': {adapter_dir} is not a PEFT adapter directory "
                                  f"(no {ADAPTER_CONFIG})")
        base_path = _locate(base_part, candidates, f"base of '{ref}'")
        return LoraCheckpoint.open(adapter_dir, base_path, allow_pickle=allow_pickle)
    found = next((p for p in candidates(ref) if p.exists()), None)
    if found is None or not is_adapter_dir(found):
        return None
    if base_ref is None:
        raise CheckpointError(f"model '{ref}' is a LoRA adapter ({found / ADAPTER_CONFIG}); it needs a base: set "
                              "base_model in the config, or write the model as 'base+adapter'")
    if base_ref == ref:
        raise CheckpointError(f"base_model '{ref}' is a LoRA adapter; the base must be a full checkpoint")
    base_path = _locate(base_ref, candidates, "base_model")
    return LoraCheckpoint.open(found, base_path, allow_pickle=allow_pickle)


def _locate(ref: str, candidates: Callable[[str], list[Path]], what: str) -> Path:
    found = next((p for p in candidates(ref) if p.exists()), None)
    if found is None:
        tried = ", ".join(str(p) for p in candidates(ref))
        raise CheckpointError(f"{what}: '{ref}' not found (looked at {tried})")
    return found


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide ΔW."""

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None

    @classmethod
    def read(cls, path: Path) -> AdapterConfig:
        """Parse and validate ``adapter_config.json``; CheckpointError for anything we cannot merge."""
        try:
            if path.stat().st_size > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large for an adapter config")
            obj: Any = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: cannot read adapter config as JSON: {e}") from e
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: adapter config must be a JSON object")
        peft_type = obj.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise CheckpointError(f"{path}: peft_type is {peft_type!r}; only LoRA adapters (LORA) are supported")
        for key, why in _REFUSED_KEYS.items():
            if obj.get(key):
                raise CheckpointError(f"{path}: {why}")
        init = obj.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_MODIFIED_BASE_INITS):
            raise CheckpointError(
                f"{path}: init_lora_weights={init!r} trains against a modified base weight that the adapter does "
                "not store; save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA")
        ranks, alphas = _mapping(obj, "rank_pattern", path), _mapping(obj, "alpha_pattern", path)
        return cls(
            path=path,
            r=_number(obj, "r", int, path),
            lora_alpha=_number(obj, "lora_alpha", float, path),
            use_rslora=bool(obj.get("use_rslora", False)),
            fan_in_fan_out=bool(obj.get("fan_in_fan_out", False)),
            rank_pattern={k: _number(ranks, k, int, path, "rank_pattern") for k in ranks},
            alpha_pattern={k: _number(alphas, k, float, path, "alpha_pattern") for k in alphas},
            base_model_name_or_path=obj.get("base_model_name_or_path"),
        )

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of one module after rank_pattern / alpha_pattern."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return r, alpha

    def scale(self, module: str) -> float:
        """s = lora_alpha / r, or lora_alpha / √r with use_rslora (per-module r and alpha)."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT's rule: the first pattern p (in the config's order) for which the module name ends in a
    # dot-separated match of p wins.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _mapping(obj: dict, key: str, path: Path) -> dict:
    value = obj.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: '{key}' must be an object, got {type(value).__name__}")
    return value


def _number(obj: dict, key: str, kind: type, path: Path, where: str = "") -> Any:
    value = obj.get(key)
    name = f"{where}[{key!r}]" if where else f"'{key}'"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise CheckpointError(f"{path}: {name} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if kind is int and value <= 0:
        raise CheckpointError(f"{path}: {name} must be positive, got {value!r}")
    return kind(value)


# ------------------------------------------------------------------------------------------ the checkpoint


@dataclass(frozen=True)
class _Delta:
    """ΔW of one base tensor: s · B @ A, transposed for fan_in_fan_out and embeddings."""

    a_key: str
    b_key: str
    scale: float
    transposed: bool


@dataclass(frozen=True)
class _Patch:
    """How one presented tensor differs from the base's: a replacement, a ΔW, a bias delta (any of them)."""

    replacement: str | None = None  # adapter tensor that replaces the base's
    delta: _Delta | None = None
    bias: tuple[str, float] | None = None  # (lora_B.bias key, s): bias += s · b


class LoraCheckpoint:
    """A base checkpoint with a PEFT LoRA adapter applied, behind ``Checkpoint``'s interface.

    ``tensor(name)`` of a patched tensor computes and returns the whole tensor (one fp32 copy, not counted in
    the executor's memory budget); ``rows(name, a, b)`` computes only rows [a, b): B[a:b] @ A.
    """

    def __init__(self, path: Path, weights: Checkpoint, base: Checkpoint, config: AdapterConfig,
                 patches: dict[str, _Patch], infos: dict[str, TensorInfo]):
        # Use LoraCheckpoint.open(); this constructor trusts that the patches were validated.
        self.path = path
        self.adapter = config
        self._weights = weights
        self._base = base
        self._patches = patches
        self._infos = infos
        self.config_path: Path | None = base.config_path  # an adapter has no config.json of its own
        self.base_path = base.path

    @classmethod
    def open(cls, adapter_dir: str | Path, base: str | Path, *, allow_pickle: bool = False) -> LoraCheckpoint:
        """Open the adapter in ``adapter_dir`` over the checkpoint at ``base`` (headers only, validated)."""
        adapter_dir = Path(adapter_dir)
        config_file = adapter_dir / ADAPTER_CONFIG
        if not config_file.is_file():
            raise CheckpointError(f"adapter {adapter_dir}: missing {ADAPTER_CONFIG}")
        config = AdapterConfig.read(config_file)
        if (adapter_dir / ADAPTER_WEIGHTS).is_file():
            weights_file = adapter_dir / ADAPTER_WEIGHTS
        elif (adapter_dir / ADAPTER_PICKLE).is_file():
            weights_file = adapter_dir / ADAPTER_PICKLE
        else:
            raise CheckpointError(f"adapter {adapter_dir}: missing {ADAPTER_WEIGHTS}")
        if is_adapter_dir(Path(base)):
            raise CheckpointError(f"adapter {adapter_dir}: its base {base} is itself an adapter; stacking adapters "
                                  "is not supported")
        weights = Checkpoint.open(weights_file, allow_pickle=allow_pickle)
        try:
            base_ck = Checkpoint.open(base, allow_pickle=allow_pickle)
        except BaseException:
            weights.close()
            raise
        try:
            patches, infos = _build_patches(weights_file, weights, base_ck, config)
        except BaseException:
            weights.close()
            base_ck.close()
            raise
        return cls(adapter_dir, weights, base_ck, config, patches, infos)

    # ---- Checkpoint interface --------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The base's tensor names, in the base's storage order."""
        return self._base.names()

    def __contains__(self, name: object) -> bool:
        return name in self._base

    def __len__(self) -> int:
        return len(self._base)

    def info(self, name: str) -> TensorInfo:
        """Dtype and shape of the presented tensor (the base's own record when the adapter leaves it alone)."""
        info = self._infos.get(name)
        return info if info is not None else self._base.info(name)

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of base + adapter: the base's zero-copy view when untouched, else computed now."""
        if name not in self._patches:
            return self._base.tensor(name)
        info = self.info(name)
        return self.rows(name, 0, info.n_rows).reshape(info.shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 of tensor ``name``; ΔW is computed for those rows only."""
        patch = self._patches.get(name)
        if patch is None:
            return self._base.rows(name, start, stop)
        info = self.info(name)
        if not (0 <= start <= stop <= info.n_rows):
            raise CheckpointError(f"adapter {self.path}: rows [{start}, {stop}) out of range for tensor {name!r} "
                                  f"with {info.n_rows} rows")
        src = (self._weights.rows(patch.replacement, start, stop) if patch.replacement is not None
               else self._base.rows(name, start, stop))
        if patch.delta is None and patch.bias is None:
            return src  # a plain replacement keeps its stored dtype, zero-copy
        dtype = info.torch_dtype
        out = src.to(dtype, copy=True)  # never write into the (copy-on-write) file mapping
        if patch.delta is not None:
            a, b, s = self._factors(patch.delta, dtype)
            if patch.delta.transposed:  # presented = (B @ A)ᵀ, rows of it are columns of A
                out += s * (a[:, start:stop].T @ b.T)
            else:
                out += s * (b[start:stop] @ a)
        if patch.bias is not None:
            key, s = patch.bias
            out += s * self._weights.tensor(key).to(dtype)[start:stop]
        return out

    def files(self) -> list[Path]:
        """The adapter's weight file, then the base's weight files."""
        return self._weights.files() + self._base.files()

    def close(self) -> None:
        self._weights.close()
        self._base.close()

    def __enter__(self) -> LoraCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LoraCheckpoint({str(self.path)!r} over {str(self._base.path)!r}, "
                f"{sum(p.delta is not None for p in self._patches.values())} LoRA modules)")

    # ---- LoRA factors ----------------------------------------------------------------------------------

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A [r, cols], B [rows, r], s) with ΔW = s · B @ A in the presented layout of tensor ``name``, or None.

        For transposed layouts (fan_in_fan_out, embeddings) the stored factors are swapped and transposed,
        so callers never see PEFT's layout. Factors are fp32 (fp64 for an fp64 adapter or base).
        """
        patch = self._patches.get(name)
        if patch is None or patch.delta is None:
            return None
        a, b, s = self._factors(patch.delta, self.info(name).torch_dtype)
        return (b.T.contiguous(), a.T.contiguous(), s) if patch.delta.transposed else (a, b, s)

    def lora_names(self) -> list[str]:
        """Base tensor names that receive a ΔW."""
        return [n for n, p in self._patches.items() if p.delta is not None]

    def _factors(self, d: _Delta, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self._weights.tensor(d.a_key).to(dtype), self._weights.tensor(d.b_key).to(dtype), d.scale


# ------------------------------------------------------------------------------------ reading the adapter


def _build_patches(weights_file: Path, weights: Checkpoint, base: Checkpoint,
                   config: AdapterConfig) -> tuple[dict[str, _Patch], dict[str, TensorInfo]]:
    """Classify every adapter tensor, check it against the base, and return the patches and presented infos."""
    where = f"adapter {weights_file}"
    a_keys: dict[str, tuple[str, bool]] = {}  # module -> (lora_A key, is embedding)
    b_keys: dict[str, tuple[str, bool]] = {}
    bias_keys: dict[str, str] = {}
    replacements: dict[str, str] = {}  # base tensor name -> adapter key
    for key in weights.names():
        info = weights.info(key)
        if info.dtype not in _FLOAT_ST:
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {info.dtype}; expected a float dtype")
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"{where}: tensor {key!r} is a DoRA magnitude; DoRA is not supported yet")
        if "trainable_tokens_" in name:
            raise CheckpointError(f"{where}: tensor {key!r}: trainable tokens are not supported")
        for suffix, table, emb in ((".lora_A.weight", a_keys, False), (".lora_B.weight", b_keys, False),
                                   (".lora_embedding_A", a_keys, True), (".lora_embedding_B", b_keys, True)):
            if name.endswith(suffix):
                table[name[: -len(suffix)]] = (key, emb)
                break
        else:
            if name.endswith(".lora_B.bias"):
                bias_keys[name[: -len(".lora_B.bias")]] = key
            elif re.search(r"\.lora_[A-Za-z_]+(\.|$)", name):
                raise CheckpointError(f"{where}: tensor {key!r} is not a LoRA tensor we know (lora_A.weight, "
                                      "lora_B.weight, lora_B.bias, lora_embedding_A/B)")
            else:
                # modules_to_save, bias: all, or a saved base_layer: a full tensor that replaces the base's
                target = name.replace(".base_layer.", ".")
                if target not in base:
                    raise CheckpointError(f"{where}: tensor {key!r} replaces base tensor {target!r}, but the base "
                                          f"{base.path} has no such tensor")
                replacements[target] = key

    for module in sorted(set(a_keys) ^ set(b_keys)):
        have, missing = ("lora_A", "lora_B") if module in a_keys else ("lora_B", "lora_A")
        raise CheckpointError(f"{where}: module {module!r} has {have} but no {missing}")

    patches: dict[str, _Patch] = {}
    infos: dict[str, TensorInfo] = {}

    def shape_of(name: str) -> tuple[int, ...]:
        return tuple(weights.info(replacements[name]).shape if name in replacements else base.info(name).shape)

    for module in sorted(a_keys):
        (a_key, emb), (b_key, _) = a_keys[module], b_keys[module]
        target = f"{module}.weight"
        if target not in base:
            raise CheckpointError(f"{where}: LoRA module {module!r} targets {target!r}, but the base {base.path} has "
                                  "no such tensor")
        a_shape, b_shape = tuple(weights.info(a_key).shape), tuple(weights.info(b_key).shape)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(f"{where}: {a_key!r} has shape {list(a_shape)} and {b_key!r} {list(b_shape)}; "
                                  "only 2-D LoRA factors (linear and embedding layers) are supported, not "
                                  "convolutions")
        # linear: A [r, in], B [out, r]; PEFT's embedding layout: A [r, vocab], B [dim, r], ΔW = (B @ A)ᵀ
        r, r_b = a_shape[0], b_shape[1]
        if r != r_b:
            raise CheckpointError(f"{where}: rank mismatch: {a_key!r} has shape {list(a_shape)} (rank {r}) but "
                                  f"{b_key!r} has shape {list(b_shape)} (rank {r_b})")
        cfg_r, _ = config.rank_and_alpha(module)
        if cfg_r != r:
            raise CheckpointError(f"{where}: {a_key!r} has rank {r} but {config.path.name} gives module {module!r} "
                                  f"r={cfg_r} (r / rank_pattern)")
        ba = (b_shape[0], a_shape[1])  # shape of B @ A
        target_shape = shape_of(target)
        if emb:
            transposed = True
        else:
            # Conv1D layers (GPT-2) store W as [in, out] and need fan_in_fan_out; PEFT forces the right value
            # per layer type, which shows in the base's shape. A square weight follows the config.
            transposed = config.fan_in_fan_out if ba[0] == ba[1] else target_shape == ba[::-1]
        want = ba[::-1] if transposed else ba
        if target_shape != want:
            raise CheckpointError(
                f"{where}: shape mismatch for {target!r}: {a_key!r} {list(a_shape)} and {b_key!r} {list(b_shape)} "
                f"give ΔW of shape {list(want)}, but the base tensor has shape {list(target_shape)}")
        scale = config.scale(module)
        patches[target] = _Patch(replacement=replacements.pop(target, None),
                                 delta=_Delta(a_key, b_key, scale, transposed))
        bias_key = bias_keys.pop(module, None)
        if bias_key is not None:
            bias_target = f"{module}.bias"
            if bias_target not in base:
                raise CheckpointError(f"{where}: {bias_key!r} (lora_bias) targets {bias_target!r}, but the base has "
                                      "no such tensor")
            n_out = ba[0]
            if shape_of(bias_target) != (n_out,) or tuple(weights.info(bias_key).shape) != (n_out,):
                raise CheckpointError(f"{where}: shape mismatch: {bias_key!r} has shape "
                                      f"{list(weights.info(bias_key).shape)}, base bias {bias_target!r} has "
                                      f"{list(shape_of(bias_target))}, expected [{n_out}]")
            patches[bias_target] = _Patch(replacement=replacements.pop(bias_target, None), bias=(bias_key, scale))
    if bias_keys:
        module, key = next(iter(bias_keys.items()))
        raise CheckpointError(f"{where}: {key!r} (lora_bias) has no lora_A/lora_B for module {module!r}")
    for target, key in replacements.items():
        patches[target] = _Patch(replacement=key)

    for name, patch in patches.items():
        src = weights.info(patch.replacement) if patch.replacement is not None else base.info(name)
        if patch.delta is None and patch.bias is None:
            dtype = src.torch_dtype
        else:
            # fp32 math (fp64 if any operand is fp64), and the sum is presented unrounded
            operands = [patch.delta.a_key, patch.delta.b_key] if patch.delta else [patch.bias[0]]  # type: ignore
            dtype = torch.float32
            for d in [src.torch_dtype] + [weights.info(k).torch_dtype for k in operands]:
                dtype = torch.promote_types(dtype, d)
        nbytes = math.prod(src.shape) * dtype.itemsize
        infos[name] = TensorInfo(name=name, dtype=TORCH_TO_ST[dtype], shape=tuple(src.shape), begin=0, end=nbytes,
                                 path=weights_file)
    return patches, infos
