"""Config + checkpoint headers -> the work: one ``PlannedTensor`` per output tensor, and the output layout.

Pure planning: opens every input (headers only, validated), checks every tensor each input must provide
(presence, shape, float dtype), resolves every method parameter per tensor and per model, and lays out the
output shards. No weight byte is read here, so a bad input fails before any merging starts.

Tensor structure follows mergekit without architecture tables: a tensor whose name has a ``<layers>.<i>.``
component (``layers``, ``h``, ``blocks``, ``layer``) belongs to layer i; the others are "pre" weights
(embeddings: names containing ``embed``, ``wte``, ``wpe``) or "post" weights (final norm, lm_head...).
``models:`` mode is one slice over every layer; in ``slices:`` mode the output layers are the slices'
layers in order, pre weights come from the first slice's sources and post weights from the last slice's.
Gradients use t = offset / (slice layers - 1) inside each slice (1 for a one-layer slice), 0 outside layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import MergeConfig, candidate_paths, layer_t, load_config, parse_dtype, resolve_parameter
from .errors import CheckpointError, ConfigError, MergeError
from .io.checkpoint import Checkpoint
from .io.lora import open_lora_reference
from .io.safetensors_format import TORCH_TO_ST, TensorInfo
from .io.safetensors_writer import ShardLayout, plan_shards
from .io.statistics import StatisticsReader
from .methods import Method, TensorJob, get_method

_LAYER_RE = re.compile(r"^(?P<head>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<idx>\d+)(?P<tail>\..+)$")
_PRE_MARKERS = ("embed", "wte", "wpe")
_FLOAT_ST = ("F64", "F32", "F16", "BF16")


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """(head, layer index, tail) for a per-layer tensor name, None for a pre/post weight."""
    m = _LAYER_RE.match(name)
    return (m["head"], int(m["idx"]), m["tail"]) if m else None


def is_pre_weight(name: str) -> bool:
    leaf = name.lower()
    return any(marker in leaf for marker in _PRE_MARKERS)


@dataclass
class PlannedTensor:
    """One output tensor: where its inputs come from and the resolved job for the method."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    sources: list[tuple[str, str]]  # (model label, input tensor name), aligned with job.inputs
    job: TensorJob

    @property
    def out_bytes(self) -> int:
        return self.job.numel * torch.empty(0, dtype=self.out_dtype).element_size()


@dataclass
class Plan:
    config: MergeConfig
    method: Method
    checkpoints: dict[str, Checkpoint]  # model label -> opened checkpoint
    tensors: list[PlannedTensor]
    shards: list[ShardLayout]
    reference_model: str  # label of the model whose config.json seeds the output
    tokenizer_model: str | None  # label whose tokenizer files are copied
    num_layers: int | None  # output layer count (None when the model has no numbered layers)
    global_params: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"  # kernel backend the merge runs on (set by the caller after resolve_backend)
    backend_explicit: bool = False  # asked for by name: a tensor the backend cannot run is then an error

    @property
    def input_bytes(self) -> int:
        total = 0
        for t in self.tensors:
            for label, name in t.sources:
                total += self.checkpoints[label].info(name).nbytes
        return total

    @property
    def output_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)

    def close(self) -> None:
        for ck in self.checkpoints.values():
            ck.close()


# ----------------------------------------------------------------------------------------------- inputs


def _open_models(config: MergeConfig, allow_pickle: bool) -> dict[str, Checkpoint]:
    config_dir = config.source_path.parent if config.source_path else None
    out: dict[str, Checkpoint] = {}
    for ref in config.referenced_models():
        adapter = open_lora_reference(ref, config.base_model, lambda r: candidate_paths(r, config_dir),
                                      allow_pickle=allow_pickle)  # PEFT adapters stand where models do
        if adapter is not None:
            out[ref] = adapter  # type: ignore[assignment]  # same interface as Checkpoint
            continue
        found = next((p for p in candidate_paths(ref, config_dir) if p.exists()), None)
        if found is None:
            tried = ", ".join(str(p) for p in candidate_paths(ref, config_dir))
            raise CheckpointError(f"model '{ref}' not found (looked at {tried}); pymerge reads local checkpoints "
                                  "(a directory or a .safetensors file)")
        out[ref] = Checkpoint.open(found, allow_pickle=allow_pickle)
    return out


@dataclass
class _Slice:
    """One output slice: its sources (model, first layer), layer count, base, index in config.slices."""

    sources: list[tuple[str, int]]
    num_layers: int
    base: str | None
    index: int | None  # None in models: mode


def _slices(config: MergeConfig, cks: dict[str, Checkpoint], method: Method) -> list[_Slice]:
    if config.models is not None:
        labels = [m.model for m in config.models]
        if config.base_model is not None and config.base_model not in labels:
            labels.append(config.base_model)  # mergekit adds a configured base as an input
        layers = _layer_count(cks[config.base_model or labels[0]])
        return [_Slice([(m, 0) for m in labels], layers, config.base_model, None)]
    out = []
    for i, s in enumerate(config.slices):
        out.append(_Slice([(src.model, src.layer_range[0]) for src in s.sources], s.num_layers,
                          s.base_model or config.base_model, i))
    return out


def _layer_count(ck: Checkpoint) -> int:
    idx = [p[1] for p in (split_layer_name(n) for n in ck.names()) if p]
    return max(idx) + 1 if idx else 0


# --------------------------------------------------------------------------------------------- parameters


def _unknown_parameters(config: MergeConfig, method: Method) -> None:
    known = {p.name for p in method.spec.params}
    scopes: list[tuple[str, dict | None]] = [("parameters", config.parameters)]
    for i, m in enumerate(config.models or ()):
        scopes.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(config.slices or ()):
        scopes.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            scopes.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    for where, scope in scopes:
        for key in scope or {}:
            if key not in known:
                raise ConfigError(f"config: {where}.{key}: unknown parameter for merge_method "
                                  f"'{method.spec.name}' (known: {', '.join(sorted(known))})")


def _resolve(config: MergeConfig, method: Method, out_name: str, t: float, inputs: list[str],
             input_names: list[str], base_index: int | None, slice_index: int | None):
    params: dict[str, Any] = {}
    model_params: list[dict[str, Any]] = [dict() for _ in inputs]
    for spec in method.spec.params:
        if spec.per_model:
            for i, label in enumerate(inputs):
                if method.spec.needs_base and i == base_index:
                    continue  # mergekit's NON_BASE parameters: the base takes none
                where = f"tensor '{out_name}', model '{label}'"
                value = spec.coerce(resolve_parameter(config, spec.name, tensor_name=input_names[i], t=t,
                                                      model=label, slice_index=slice_index), where)
                if value is None:
                    if spec.required:
                        raise ConfigError(f"config: parameter '{spec.name}' is required for model '{label}' "
                                          f"({method.spec.name}); set it under that model's parameters")
                    value = spec.default
                model_params[i][spec.name] = value
        else:
            value = spec.coerce(resolve_parameter(config, spec.name, tensor_name=out_name, t=t,
                                                  slice_index=slice_index), f"tensor '{out_name}'")
            if value is None:
                if spec.required:
                    raise ConfigError(f"config: parameter '{spec.name}' is required by {method.spec.name}; "
                                      "set it under 'parameters'")
                value = spec.default
            params[spec.name] = value
    return params, model_params


# ------------------------------------------------------------------------------------------------ planning


def build_plan(config: MergeConfig | str | Path | dict, *, seed: int = 0, out_shard_size: int = 5 * 10**9,
               allow_pickle: bool = False) -> Plan:
    """Plan a merge: open and validate every input's headers, resolve every tensor, lay out the shards."""
    if not isinstance(config, MergeConfig):
        config = load_config(config)
    method = get_method(config.merge_method)
    _unknown_parameters(config, method)
    cks = _open_models(config, allow_pickle)
    try:
        return _plan(config, method, cks, seed, out_shard_size)
    except BaseException:
        for ck in cks.values():
            ck.close()
        raise


def _plan(config: MergeConfig, method: Method, cks: dict[str, Checkpoint], seed: int,
          out_shard_size: int) -> Plan:
    labels = config.referenced_models()
    model_ids = {label: i for i, label in enumerate(labels)}
    slices = _slices(config, cks, method)
    compute_dtype = parse_dtype(config.dtype, "dtype") if config.dtype else None
    out_dtype_cfg = parse_dtype(config.out_dtype, "out_dtype") if config.out_dtype else None

    for s in slices:
        inputs = [m for m, _ in s.sources]
        where = f"slices[{s.index}]" if s.index is not None else "models"
        if method.spec.needs_base:
            if s.base is None:
                raise ConfigError(f"config: merge_method '{method.spec.name}' needs a base_model")
            if s.base not in inputs:
                raise ConfigError(f"config: {where}: base_model '{s.base}' is not one of this slice's sources")
        if len(inputs) < method.spec.min_inputs:
            raise ConfigError(f"config: {where}: {method.spec.name} needs at least {method.spec.min_inputs} "
                              f"input models (the base counts), got {len(inputs)}")
        if method.spec.max_inputs is not None and len(inputs) > method.spec.max_inputs:
            extra = " (the base_model counts as an input)" if s.base is not None else ""
            raise ConfigError(f"config: {where}: {method.spec.name} takes at most {method.spec.max_inputs} input "
                              f"model(s), got {len(inputs)}{extra}")
        for m, start in s.sources:
            have = _layer_count(cks[m])
            if s.index is not None and start + s.num_layers > have:
                raise ConfigError(f"config: slices[{s.index}]: layer_range of '{m}' ends at {start + s.num_layers} "
                                  f"but the model has {have} layers")

    # The reference model defines the tensor list: the first slice's base, else its first source.
    ref_label = slices[0].base or slices[0].sources[0][0]
    ref = cks[ref_label]
    pre, post, layer_tails = [], [], {}
    for name in ref.names():
        parts = split_layer_name(name)
        if parts is None:
            (pre if is_pre_weight(name) else post).append(name)
        else:
            layer_tails.setdefault(parts[1], []).append((parts[0], parts[2]))
    # per-layer tensor set from the reference's first layer (every layer of an LLM has the same set)
    template = layer_tails.get(min(layer_tails)) if layer_tails else []

    planned: list[PlannedTensor] = []
    stats = StatisticsReader(config.source_path.parent if config.source_path else None)
    stat_params = [p for p in method.spec.params if p.statistics]
    shapes = {m: {n: ck.info(n).shape for n in ck.names()} for m, ck in cks.items()} if stat_params else {}

    def add(out_name: str, s: _Slice, in_names: list[str], t: float):
        inputs = [m for m, _ in s.sources]
        base_index = inputs.index(s.base) if (s.base is not None and s.base in inputs) else None
        infos: list[TensorInfo] = []
        for (m, _), in_name in zip(s.sources, in_names):
            if in_name not in cks[m]:
                raise MergeError(f"model '{m}' has no tensor '{in_name}' (needed for output '{out_name}')")
            infos.append(cks[m].info(in_name))
        shape = tuple(infos[0].shape)
        for (m, _), info in zip(s.sources, infos):
            if tuple(info.shape) != shape:
                raise MergeError(f"tensor '{info.name}' of model '{m}' has shape {list(info.shape)}, expected "
                                 f"{list(shape)} like '{s.sources[0][0]}'")
            if info.dtype not in _FLOAT_ST:
                raise MergeError(f"tensor '{info.name}' of model '{m}' has dtype {info.dtype}; only floating-point "
                                 f"tensors ({', '.join(_FLOAT_ST)}) can be merged")
        params, model_params = _resolve(config, method, out_name, t, inputs, in_names, base_index, s.index)
        job = TensorJob(name=out_name, shape=shape, inputs=inputs, base_index=base_index, params=params,
                        model_params=model_params, model_ids=[model_ids[m] for m in inputs], seed=seed)
        for sp in stat_params:  # per-model statistics files (fisher, regmean): validated zero-copy views
            job.aux[sp.name] = [stats.for_tensor(mp.get(sp.name), sp.statistics, m, shapes[m], n)
                                for m, n, mp in zip(inputs, in_names, model_params)]
        ref_info = infos[base_index if base_index is not None else 0]
        out_dtype = out_dtype_cfg or compute_dtype or ref_info.torch_dtype
        planned.append(PlannedTensor(out_name, shape, out_dtype, list(zip(inputs, in_names)), job))

    for name in pre:
        add(name, slices[0], [name] * len(slices[0].sources), 0.0)
    out_layer = 0
    for s in slices:
        for k in range(s.num_layers):
            t = layer_t(k, s.num_layers)
            for head, tail in template:
                out_name = f"{head}{out_layer}{tail}"
                add(out_name, s, [f"{head}{start + k}{tail}" for _, start in s.sources], t)
            out_layer += 1
    for name in post:
        add(name, slices[-1], [name] * len(slices[-1].sources), 0.0)

    if not planned:
        raise MergeError(f"model '{ref_label}' has no tensors to merge")
    shards = plan_shards([(p.name, TORCH_TO_ST[p.out_dtype], p.shape) for p in planned], out_shard_size)
    tok = config.tokenizer_source
    tok_label = (slices[0].base or ref_label) if tok in (None, "base") else tok
    return Plan(config=config, method=method, checkpoints=cks, tensors=planned, shards=shards,
                reference_model=ref_label, tokenizer_model=tok_label,
                num_layers=out_layer if layer_tails else None)
