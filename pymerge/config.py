"""Merge configuration: pydantic models that read mergekit's YAML unchanged.

``load_config`` accepts the mergekit config format (``merge_method``, ``base_model``,
``models`` or ``slices``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``,
``chat_template``) and rejects, with a one-line ``ConfigError`` naming the key, anything
else: typos (mergekit silently ignores unknown keys; we do not), mergekit features we do
not support yet (``modules``, ``tokenizer``, ``tokenizer_source: union``, LoRA
``model+lora`` references, ``residual_weight``) and impossible combinations.

Model references are checkpoint directories, stored as written. Relative paths are
looked up from the current directory first, then from the config file's directory
(:func:`candidate_paths`, :meth:`MergeConfig.resolve_paths`); the planner checks that
they exist. Nothing here reads weights.

YAML note: PyYAML follows YAML 1.1, where ``1e-3`` is a *string*; mergekit fixes such
values up later with each parameter's type. We read plain (unquoted) scalars like
``1e-3`` / ``1.0e3`` as floats instead (YAML 1.2), which gives the same numbers for
numeric parameters; quote a value to keep it a string.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Optional

import torch
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from pymerge.config_settings import (
    NON_LAYER_T,
    ConditionalParameter,
    ParameterSetting,
    Scalar,
    ScalarOrGradient,
    config_problem,
    evaluate_setting,
    layer_t,
    parse_setting,
    show,
)
from pymerge.errors import ConfigError

__all__ = [
    "DTYPE_NAMES",
    "NON_LAYER_T",
    "ConditionalParameter",
    "InputModel",
    "InputSlice",
    "MergeConfig",
    "OutputSlice",
    "ParameterSetting",
    "Scalar",
    "ScalarOrGradient",
    "candidate_paths",
    "evaluate_setting",
    "layer_t",
    "load_config",
    "parse_dtype",
    "parse_setting",
    "resolve_parameter",
]

# ---------------------------------------------------------------------------- dtypes

#: Accepted dtype spellings (lower-case; a leading "torch." is also accepted, as in mergekit).
#: mergekit's own names are float32 / float16 / bfloat16; the short forms are ours.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "f32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "f16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_CANONICAL_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# mergekit accepts these but pymerge computes in fp32 and writes 16/32-bit floats only.
_UNSUPPORTED_DTYPES = ("float64", "double", "fp64", "int64")


def _dtype_problem(name: Any) -> str | None:
    """Return why ``name`` is not an accepted dtype, or None if it is."""
    if not isinstance(name, str):
        return f"expected a dtype name (a string), got {show(name)}"
    key = name.strip().lower().removeprefix("torch.")
    if key in DTYPE_NAMES:
        return None
    accepted = ", ".join(DTYPE_NAMES)
    if key in _UNSUPPORTED_DTYPES:
        why = "pymerge writes float32, float16 or bfloat16"
        return f"'{name}' is not supported ({why}); accepted: {accepted}"
    return f"unknown dtype '{name}'; accepted: {accepted}"


def parse_dtype(name: str, key: str) -> torch.dtype:
    """Return the torch dtype named ``name``; raise ConfigError naming config key ``key``."""
    problem = _dtype_problem(name)
    if problem is not None:
        raise ConfigError(f"config: {key}: {problem}")
    return DTYPE_NAMES[name.strip().lower().removeprefix("torch.")]


# ------------------------------------------------------------------ field validators


def _check_model_ref(value: Any) -> str:
    if isinstance(value, Mapping):
        raise config_problem(
            "mergekit's mapping form of a model reference ({model, lora, override_architecture}) "
            "is not supported; give the checkpoint directory as a string"
        )
    if not isinstance(value, str):
        raise config_problem(f"expected a model path (a string), got {show(value)}")
    if not value.strip():
        raise config_problem("empty model path")
    if "+" in value and not all(part.strip() for part in value.split("+", 1)):
        # mergekit reads "model+adapter" as a LoRA adapter applied to model (pymerge/io/lora.py opens it)
        raise config_problem(f"'{value}': expected 'model+adapter' with both parts given")
    return value


def _check_layer_range(value: Any) -> tuple[int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise config_problem(f"expected [start, end] (two integers), got {show(value)}")
    start, end = value
    if start < 0:
        raise config_problem(f"start must be >= 0, got {list(value)}")
    if end <= start:
        raise config_problem(
            f"{list(value)} holds no layers: ranges are half-open [start, end), so end must be "
            "greater than start"
        )
    return (start, end)


ModelRef = Annotated[str, BeforeValidator(_check_model_ref)]
LayerRange = Annotated[tuple[int, int], BeforeValidator(_check_layer_range)]
Parameters = dict[str, ParameterSetting]


class _ConfigModel(BaseModel):
    """Base of the config models: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Keys mergekit accepts here that we do not support yet, and why.
    _unsupported: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for key, why in cls._unsupported.items():
                if key in data:
                    raise config_problem(why, key, kind="unsupported")
        return data


class InputModel(_ConfigModel):
    """One whole model in ``models:``, with its own parameters."""

    model: ModelRef
    parameters: Optional[Parameters] = None


class InputSlice(_ConfigModel):
    """One source of an output slice: layers ``[start, end)`` of ``model``."""

    model: ModelRef
    layer_range: LayerRange
    parameters: Optional[Parameters] = None

    @property
    def num_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


class OutputSlice(_ConfigModel):
    """A run of output layers, merged from the same number of layers of each source."""

    _unsupported = {"residual_weight": "'residual_weight' is not supported (mergekit ignores it too)"}

    sources: list[InputSlice]
    base_model: Optional[ModelRef] = None
    parameters: Optional[Parameters] = None

    @model_validator(mode="after")
    def _check_sources(self) -> OutputSlice:
        if not self.sources:
            raise config_problem("a slice needs at least one source", "sources")
        first = self.sources[0]
        seen: dict[str, int] = {}
        for i, src in enumerate(self.sources):
            if src.num_layers != first.num_layers:
                raise config_problem(
                    f"{list(src.layer_range)} has {src.num_layers} layers but sources[0] has "
                    f"{list(first.layer_range)} ({first.num_layers}); every source of a slice "
                    "must give the same number of layers",
                    "sources",
                    i,
                    "layer_range",
                )
            if src.model in seen:
                raise config_problem(
                    f"'{src.model}' is already sources[{seen[src.model]}] of this slice "
                    "(a model can be merged with itself only across slices)",
                    "sources",
                    i,
                    "model",
                )
            seen[src.model] = i
        if self.base_model is not None and self.base_model not in seen:
            # In slice mode the base contributes through its own source entry (which says
            # which layers to read); a slice base that is not a source has no layers.
            raise config_problem(
                f"'{self.base_model}' is not one of this slice's sources; list it in 'sources' "
                "with its layer_range",
                "base_model",
            )
        return self

    @property
    def num_layers(self) -> int:
        return self.sources[0].num_layers


# Chat templates known by name. ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message, then the
# assistant header when a generation prompt is requested.
NAMED_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
}


class MergeConfig(_ConfigModel):
    """A whole merge: method, inputs (``models`` or ``slices``), parameters, dtypes.

    ``dtype`` / ``out_dtype`` are stored canonical (float32 / float16 / bfloat16). In
    mergekit ``dtype`` is what inputs are converted to before merging (so also the output
    dtype when ``out_dtype`` is unset) and ``out_dtype`` what is written.
    """

    _unsupported = {
        "modules": "mergekit's per-module configuration ('modules') is not supported yet; "
        "use 'models' or 'slices'",
        "tokenizer": "'tokenizer' (vocabulary merging / added tokens) is not supported yet",
    }

    merge_method: str
    base_model: Optional[ModelRef] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None

    # The file the config was read from, if any (for resolving relative model paths).
    _source_path: Optional[Path] = PrivateAttr(default=None)

    @field_validator("merge_method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        if not value.strip():
            raise config_problem("expected a merge method name, got an empty string")
        return value

    @field_validator("dtype", "out_dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: Any) -> Any:
        if value is None:
            return None
        problem = _dtype_problem(value)
        if problem is not None:
            raise config_problem(problem)
        return _CANONICAL_DTYPE[DTYPE_NAMES[value.strip().lower().removeprefix("torch.")]]

    @field_validator("chat_template", mode="before")
    @classmethod
    def _check_chat_template(cls, value: Any) -> Any:
        # mergekit also accepts template *names* that it resolves from its own data; we know "chatml" (the
        # format is a public convention) and otherwise take the Jinja text itself (written to
        # chat_template.jinja in the output)
        if value is None or value in NAMED_CHAT_TEMPLATES:
            return value
        if not (isinstance(value, str) and ("{{" in value or "{%" in value)):
            raise config_problem(f"expected Jinja template text or one of {sorted(NAMED_CHAT_TEMPLATES)}; other "
                                 "named templates (e.g. 'auto') are not supported yet")
        return value

    def chat_template_text(self) -> str | None:
        """The Jinja text of ``chat_template`` (a known name resolved), or None."""
        return NAMED_CHAT_TEMPLATES.get(self.chat_template, self.chat_template)

    @field_validator("tokenizer_source", mode="before")
    @classmethod
    def _check_tokenizer_source(cls, value: Any) -> Any:
        if value == "union":
            raise config_problem("'union' (a merged vocabulary) is not supported yet; use 'base' or a model")
        if value is None or value == "base":
            return value
        return _check_model_ref(value)

    @model_validator(mode="after")
    def _check_inputs(self) -> MergeConfig:
        if self.models is None and self.slices is None:
            raise config_problem(
                "one of 'models' (merge whole models) or 'slices' (merge layer ranges) is required"
            )
        if self.models is not None and self.slices is not None:
            raise config_problem("'models' and 'slices' are both given; use exactly one of them")
        if self.models is not None:
            if not self.models:
                raise config_problem("empty list; name at least one model", "models")
            seen: dict[str, int] = {}
            for i, m in enumerate(self.models):
                if m.model in seen:
                    raise config_problem(
                        f"'{m.model}' is already models[{seen[m.model]}]", "models", i, "model"
                    )
                seen[m.model] = i
        if self.slices is not None and not self.slices:
            raise config_problem("empty list; give at least one slice", "slices")

        src = self.tokenizer_source
        if src == "base" and self.base_model is None:
            raise config_problem("'base' needs a base_model", "tokenizer_source")
        if src not in (None, "base") and src not in self.referenced_models():
            raise config_problem(
                f"'{src}' is not a model of this merge (expected 'base' or one of "
                f"{self.referenced_models()})",
                "tokenizer_source",
            )
        return self

    @property
    def source_path(self) -> Path | None:
        """The YAML file this config was loaded from, or None."""
        return self._source_path

    def referenced_models(self) -> list[str]:
        """Return every model the merge reads: the base first (if any), then in order of
        appearance, each once."""
        refs: list[str] = []

        def add(ref: str | None) -> None:
            if ref is not None and ref not in refs:
                refs.append(ref)

        add(self.base_model)
        for m in self.models or ():
            add(m.model)
        for s in self.slices or ():
            add(s.base_model)  # always one of the slice's sources (checked above)
            for src in s.sources:
                add(src.model)
        return refs

    def to_yaml(self) -> str:
        """Return the config as YAML that both mergekit and load_config read back."""
        data = self.model_dump(mode="json", exclude_none=True)
        return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False)

    def resolve_paths(self, base_dir: str | Path) -> MergeConfig:
        """Return a copy whose relative (and ``~``) model paths are made absolute against
        ``base_dir``; absolute paths are kept.

        Rule for finding a model: a relative path is looked up from the current directory
        first, then from the config file's directory (:func:`candidate_paths`); the planner
        calls this with the config file's directory when the first lookup fails.
        """
        base_dir = Path(base_dir)

        def fix(ref: str | None) -> str | None:
            if ref is None:
                return None
            if Path(ref).is_absolute():
                return ref
            return os.path.normpath(base_dir / Path(ref).expanduser())

        data = self.model_dump(mode="python")
        data["base_model"] = fix(data["base_model"])
        for m in data["models"] or ():
            m["model"] = fix(m["model"])
        for s in data["slices"] or ():
            s["base_model"] = fix(s["base_model"])
            for src in s["sources"]:
                src["model"] = fix(src["model"])
        if data["tokenizer_source"] not in (None, "base"):
            data["tokenizer_source"] = fix(data["tokenizer_source"])
        resolved = _validate(data, "config")
        resolved._source_path = self._source_path
        return resolved


def candidate_paths(ref: str, config_dir: str | Path | None) -> list[Path]:
    """Return where to look for model ``ref``, in order: as given (relative to the current
    directory, ``~`` expanded), then relative to ``config_dir`` (for a relative path and a
    known config directory). The first that exists is the model."""
    path = Path(ref).expanduser()
    out = [path]
    if not path.is_absolute() and config_dir is not None:
        out.append(Path(config_dir) / path)
    return out


# ------------------------------------------------------------------ parameter lookup


def resolve_parameter(
    config: MergeConfig,
    name: str,
    *,
    tensor_name: str,
    t: float,
    model: Optional[str] = None,
    slice_index: Optional[int] = None,
    validate: Optional[Callable[[Any], Any]] = None,
) -> Any | None:
    """Return the value of parameter ``name`` for one tensor, or None if nothing sets it.

    Scopes are tried from the highest precedence down, and the first that *yields a value*
    wins (a scope whose {filter, value} entries match nothing falls through, as in
    mergekit):

    1. the model's own parameters, when ``model`` is given: ``models[i].parameters`` for
       that model, or in slice mode the parameters of that model's source entry in slice
       ``slice_index``;
    2. the output slice's parameters (slice mode);
    3. the global ``parameters``.

    ``model=None`` resolves a shared (not per-model) parameter. In ``models:`` mode
    ``slice_index`` must be None or 0 (the whole merge is one slice); in slice mode it is
    required. ``t`` and ``tensor_name`` are as in :func:`evaluate_setting` (see
    :func:`layer_t` for how mergekit picks them); ``validate`` as there.
    """
    scopes: list[dict[str, Any] | None] = []
    if config.models is not None:
        if slice_index not in (None, 0):
            raise ValueError(f"slice_index {slice_index}: a 'models' config has a single slice")
        if model is not None:
            scopes += [m.parameters for m in config.models if m.model == model]
    else:
        assert config.slices is not None
        if slice_index is None or not 0 <= slice_index < len(config.slices):
            raise ValueError(f"slice_index {slice_index} is not one of {len(config.slices)} slices")
        out_slice = config.slices[slice_index]
        if model is not None:
            scopes += [s.parameters for s in out_slice.sources if s.model == model]
        scopes.append(out_slice.parameters)
    scopes.append(config.parameters)

    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t, validate=validate)
            if value is not None:
                return value
    return None


# --------------------------------------------------------------------------- loading

# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: "1e-3", "1.0e3", "-2E+5".
_FLOAT_12 = re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML loader that reads YAML 1.2 exponent floats and rejects duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(
                        f"{self.name}: duplicate key '{key}' at line {line} "
                        f"(first at line {seen[key]})"
                    )
                seen[key] = line
            except TypeError:  # unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep=deep)


class _ConfigDumper(yaml.SafeDumper):
    """YAML dumper: number lists in flow style ([0, 0.5, 1]); quotes strings like '1e-3'
    so that _ConfigLoader reads them back as strings."""

    def represent_list(self, data: list) -> yaml.SequenceNode:
        flow = all(isinstance(v, (int, float)) for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


for _cls in (_ConfigLoader, _ConfigDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789"))
_ConfigDumper.add_representer(list, _ConfigDumper.represent_list)


def _parse_yaml(text: str, label: str) -> Any:
    loader = _ConfigLoader(text)
    loader.name = label
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{label}: invalid YAML{where}: {what}") from None
    finally:
        loader.dispose()


def load_config(src: str | Path | Mapping | MergeConfig) -> MergeConfig:
    """Return the validated MergeConfig from a YAML file path, YAML text or a dict.

    A ``str`` is a path if it is one line naming an existing file or ending in
    .yml/.yaml; otherwise it is YAML text. Raises ConfigError with a one-line message
    naming the file and key at fault.
    """
    if isinstance(src, MergeConfig):
        return src
    path: Optional[Path] = None
    if isinstance(src, Path):
        path = src
    elif isinstance(src, str):
        if "\n" not in src and (os.path.isfile(src) or src.strip().endswith((".yml", ".yaml"))):
            path = Path(src)
    elif not isinstance(src, Mapping):
        raise ConfigError(f"config: expected a YAML path, YAML text or a dict, got {show(src)}")

    label = "config"
    if path is not None:
        label = str(path)
        try:
            data = _parse_yaml(path.read_text(encoding="utf-8"), label)
        except FileNotFoundError:
            raise ConfigError(f"{label}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{label}: cannot read config file: {exc}") from None
    elif isinstance(src, str):
        data = _parse_yaml(src, label)
    else:
        data = src

    config = _validate(data, label)
    if path is not None:
        config._source_path = path
    return config


def _validate(data: Any, label: str) -> MergeConfig:
    if data is None:
        raise ConfigError(f"{label}: empty config; expected merge_method and models or slices")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: expected a mapping at top level, got {show(data)}")
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        msg = f"{label}: {_describe(errors[0])}"
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        raise ConfigError(msg) from None


# ------------------------------------------------------------------- error messages

_TYPE_MESSAGES = {
    "string_type": "expected a string",
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _known_keys() -> set[str]:
    keys = {"filter", "value"}
    for cls in (InputModel, InputSlice, OutputSlice, MergeConfig):
        keys.update(cls.model_fields)
    return keys


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _where(loc: tuple) -> str:
    return f"in {_path(loc)}" if loc else "at top level"


def _describe(err: Mapping[str, Any]) -> str:
    """Return a one-line description of one pydantic error, naming the key at fault."""
    loc = tuple(err["loc"])
    kind = err["type"]
    ctx = err.get("ctx") or {}
    detail = None
    if kind.startswith("pymerge_"):
        loc += tuple(ctx.get("subloc", ()))
        kind = kind.removeprefix("pymerge_")
        detail = ctx["detail"]
    if kind in ("unknown_key", "extra_forbidden"):
        key = loc[-1]
        hint = difflib.get_close_matches(str(key), _known_keys(), n=1)
        suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
        return f"unknown key '{key}' {_where(loc[:-1])}{suggestion}"
    if "[key]" in loc:  # a mapping key of the wrong type (YAML allows `1: 0.5`)
        at = loc.index("[key]")
        return f"{_path(loc[: at - 1])}: key {loc[at - 1]!r} is not a string"
    if kind == "missing":
        return f"missing key '{loc[-1]}' {_where(loc[:-1])}"
    if detail is None:
        detail = f"{_TYPE_MESSAGES.get(kind, err['msg'])}, got {show(err.get('input'))}"
    return f"{_path(loc)}: {detail}" if loc else detail
