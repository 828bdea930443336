"""Parameter settings of a merge config, and their value for one tensor at one depth.

A *setting* is what a config gives one parameter (``weight``, ``density``, ``t``...), with
mergekit's meaning:

* a scalar (bool, int, float or str): that value everywhere;
* a list of scalars, a *gradient*: a value that varies with the relative depth ``t`` of
  the layer (see :func:`layer_t`);
* ``{filter, value}`` entries (one mapping or a list of them): the first entry whose
  filter matches the tensor name gives the value, itself a scalar or a gradient.

This module parses settings (with errors that say where the problem is) and evaluates
them; :mod:`pymerge.config` builds the config models on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, WrapValidator
from pydantic_core import PydanticCustomError

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]

SETTING_HELP = "expected a number, a list of numbers or {filter, value} entries"

# t that mergekit gives tensors outside the repeated layers (embeddings, final norm,
# lm_head); see layer_t.
NON_LAYER_T = 0.0


def config_problem(detail: str, *subloc: str | int, kind: str = "invalid") -> PydanticCustomError:
    """Build the validation error our config validators raise.

    ``subloc`` is the path below the value being validated (pydantic only knows the
    location of the value itself); ``kind`` is "invalid", "unknown_key", "missing" or
    "unsupported". :func:`pymerge.config.load_config` turns these into one-line
    ``ConfigError`` messages.
    """
    return PydanticCustomError("pymerge_" + kind, "{detail}", {"detail": detail, "subloc": subloc})


def show(value: Any, limit: int = 60) -> str:
    """Return a short repr of a user value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConditionalParameter(BaseModel):
    """One ``{filter, value}`` entry: ``value`` applies to tensors whose name contains ``filter``.

    A filter of None or ``"*"`` matches every tensor.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: ScalarOrGradient
    filter: Optional[str] = None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _check_scalar(value: Any, *subloc: str | int) -> Scalar:
    if isinstance(value, (list, tuple)):
        raise config_problem(
            f"a gradient holds numbers or strings, not nested lists (got {show(value)})", *subloc
        )
    if isinstance(value, Mapping):
        raise config_problem(
            "a list is either a gradient (numbers or strings) or a list of {filter, value} "
            f"entries, not a mix (got {show(value)})",
            *subloc,
        )
    if not _is_scalar(value):
        raise config_problem(f"{SETTING_HELP}, got {show(value)}", *subloc)
    # NaN/inf are legal YAML (.nan, .inf) but never a meaningful merge parameter.
    if isinstance(value, float) and not math.isfinite(value):
        raise config_problem(f"expected a finite number, got {value}", *subloc)
    return value


def _check_gradient(value: Any, *subloc: str | int) -> ScalarOrGradient:
    if isinstance(value, (list, tuple)):
        if not value:
            raise config_problem(f"empty list; {SETTING_HELP}", *subloc)
        return [_check_scalar(v, *subloc, i) for i, v in enumerate(value)]
    return _check_scalar(value, *subloc)


def _parse_entry(entry: Any, *subloc: str | int) -> ConditionalParameter:
    if isinstance(entry, ConditionalParameter):
        return entry
    for key in entry:
        if key not in ("filter", "value"):
            raise config_problem(
                "unknown key in a {filter, value} entry", *subloc, key, kind="unknown_key"
            )
    if "value" not in entry:
        raise config_problem("a {filter, value} entry needs 'value'", *subloc, "value", kind="missing")
    flt = entry.get("filter")
    if flt is not None and not isinstance(flt, str):
        raise config_problem(
            f"expected a substring of tensor names (a string), got {show(flt)}", *subloc, "filter"
        )
    value = entry["value"]
    if isinstance(value, Mapping) or (
        isinstance(value, (list, tuple)) and any(isinstance(v, Mapping) for v in value)
    ):
        raise config_problem(
            "a {filter, value} entry's value is a number, string or a list of them "
            "(entries do not nest)",
            *subloc,
            "value",
        )
    return ConditionalParameter(value=_check_gradient(value, *subloc, "value"), filter=flt)


def parse_setting(value: Any) -> Any:
    """Return ``value`` as a checked setting: a scalar, a list of scalars, a
    ConditionalParameter or a list of ConditionalParameter.

    Raises a pydantic custom error (a ValueError) naming the offending entry.
    """
    if isinstance(value, (ConditionalParameter, Mapping)):
        return _parse_entry(value)
    if isinstance(value, (list, tuple)):
        if not value:
            raise config_problem(f"empty list; {SETTING_HELP}")
        entries = [isinstance(v, (Mapping, ConditionalParameter)) for v in value]
        if all(entries):
            return [_parse_entry(v, i) for i, v in enumerate(value)]
        return [_check_scalar(v, i) for i, v in enumerate(value)]
    return _check_scalar(value)


def _validate_setting(value: Any, _handler: Any) -> Any:
    # Our own parser replaces pydantic's union matching, whose errors (one per union
    # member) cannot be turned into a single clear message.
    return parse_setting(value)


ParameterSetting = Annotated[
    Union[ConditionalParameter, list[ConditionalParameter], ScalarOrGradient],
    WrapValidator(_validate_setting),
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_setting(
    setting: Any,
    tensor_name: str,
    t: float,
    *,
    validate: Optional[Callable[[Any], Any]] = None,
) -> Any:
    """Return the value ``setting`` takes for tensor ``tensor_name`` at relative depth ``t``.

    * scalar: itself;
    * list of scalars (a gradient): if every element is a number (bools are not), the
      linear interpolation at position ``p = t * (len - 1)`` between elements
      ``floor(p)`` and ``min(floor(p) + 1, len - 1)``; otherwise element ``int(p)``;
    * ``{filter, value}`` entries: the value of the first entry whose filter is None,
      ``"*"``, or a substring of ``tensor_name`` (evaluated recursively); None if no
      entry matches. A single entry counts as a one-element list. An empty list is None.

    ``validate`` (default: identity) is applied to each scalar before interpolation and
    to the result, as mergekit applies the parameter's type (e.g. float("1e-3")).
    The arithmetic is mergekit's, so results agree bit for bit.
    """
    if not (0.0 <= t <= 1.0):  # also rejects NaN
        raise ValueError(f"relative depth t must be in [0, 1], got {t}")
    check = validate if validate is not None else (lambda v: v)
    raw_entries = isinstance(setting, list) and any(isinstance(v, Mapping) for v in setting)
    if raw_entries or not isinstance(setting, (ConditionalParameter, list, bool, int, float, str)):
        setting = parse_setting(setting)  # raw mappings / tuples from direct callers
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if _is_scalar(setting):
        return check(setting)
    if not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        values = [check(v) for v in setting]
        pos = t * (len(values) - 1)
        if not all(_is_number(v) for v in values):
            return values[int(pos)]
        lo = int(pos)
        hi = min(len(values) - 1, lo + 1)
        frac = pos - lo
        return check((1 - frac) * values[lo] + frac * values[hi])
    for cond in setting:
        if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
            return evaluate_setting(cond.value, tensor_name, t, validate=validate)
    return None


def layer_t(layer_index: int, num_layers: int) -> float:
    """Return the relative depth t of a layer, as mergekit computes it for gradients.

    mergekit plans each *output slice* on its own: the layer at offset ``k`` (0-based)
    within a slice of ``n`` layers gets ``t = k / (n - 1)``, and ``t = 1`` when the slice
    has a single layer. So ``layer_index``/``num_layers`` are the offset within the output
    slice and the slice's layer count, not the position in the whole output model.
    A ``models:`` config is one slice covering layers ``[0, L)`` (L from each model's
    config), so there t is simply ``layer / (L - 1)``.

    Tensors outside the repeated layers (embeddings, final norm, lm_head: mergekit's
    "pre" and "post" weights) are evaluated at ``t = 0`` (:data:`NON_LAYER_T`), both
    before and after the layers. mergekit resolves the pre weights with the first slice's
    sources and parameters and the post weights with the last slice's.

    mergekit also resolves *shared* parameters with the output tensor name but
    *per-model* parameters with that model's input tensor name (they differ when a slice
    reads layers at another index, e.g. passthrough ``layer_range: [8, 32]``).
    """
    if num_layers < 1 or not 0 <= layer_index < num_layers:
        raise ValueError(f"layer index {layer_index} is outside a slice of {num_layers} layers")
    if num_layers == 1:
        return 1.0
    return layer_index / (num_layers - 1)
