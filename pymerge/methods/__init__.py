"""The method registry: mergekit-compatible names -> Method objects (see base.py for the pass contract).

The mergekit families are registered explicitly below; every other module in this package that defines
``methods() -> list[Method]`` is registered too (in module-name order), so a new method family is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import Chunk, Method, MethodSpec, ParamSpec, TensorJob, TensorMerge
from .linear import linear_method
from .model_stock import model_stock_method
from .passthrough import passthrough_method
from .sce import sce_method
from .slerp import slerp_method
from .task_arithmetic import gta_methods

_REGISTRY: dict[str, Method] = {}


def _register(method: Method) -> None:
    assert method.spec.name not in _REGISTRY, method.spec.name
    _REGISTRY[method.spec.name] = method


for _m in [linear_method(), *gta_methods(), slerp_method(), model_stock_method(), sce_method(),
           passthrough_method()]:
    _register(_m)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    _family = importlib.import_module(f"{__name__}.{_info.name}")
    for _m in getattr(_family, "methods", lambda: [])():
        _register(_m)


def get_method(name: str) -> Method:
    """The method registered under ``name`` (ConfigError listing the known names otherwise)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"config: merge_method '{name}' is not supported; known methods: "
                          f"{', '.join(sorted(_REGISTRY))}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


__all__ = ["Chunk", "Method", "MethodSpec", "ParamSpec", "TensorJob", "TensorMerge", "get_method", "method_names"]
