"""Run mergekit (the reference implementation) in-process, and load checkpoints as plain state dicts.

mergekit is an optional test dependency: importing this module never imports it; ``mergekit_available()``
says whether it can be used, and ``run_mergekit`` raises ``ImportError`` when it cannot.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Optional, Union

import pytest
import torch
import yaml

__all__ = ["mergekit_available", "requires_mergekit", "run_mergekit", "load_state", "read_config"]


def mergekit_available() -> bool:
    """True when the ``mergekit`` package can be imported (its top-level package is empty: this is cheap)."""
    try:
        import mergekit  # noqa: F401
    except ImportError:
        return False
    return True


#: Mark a test (or a module, as ``pytestmark``) that needs mergekit; it is skipped cleanly without it.
requires_mergekit = pytest.mark.skipif(not mergekit_available(), reason="mergekit is not installed")


def read_config(config: Union[dict, str, Path]) -> dict:
    """A merge config as a dict: from a dict, a path to a YAML file, or YAML text."""
    if isinstance(config, dict):
        return config
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config and Path(config).is_file()):
        return yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    return yaml.safe_load(config)


def run_mergekit(
    config: Union[dict, str, Path],
    out_dir: Path,
    *,
    cuda: bool = False,
    extra_options: Optional[dict] = None,
) -> Path:
    """Merge with mergekit's Python API (what ``mergekit-yaml`` does, without a subprocess); return out_dir.

    Options differ from mergekit's CLI defaults where tests need it: no tokenizer copy and no model card
    (only weights and config are compared), no lazy unpickler (inputs are safetensors, and the lazy
    unpickler is experimental). ``extra_options`` are further ``MergeOptions`` fields, e.g.
    ``{"random_seed": 7}``. The caller's global RNG state is restored afterwards, since mergekit seeds the
    global torch/numpy/random generators when ``random_seed`` is given.
    """
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    data = read_config(config)
    options = {
        "cuda": cuda,
        "copy_tokenizer": False,
        "write_model_card": False,
        "lazy_unpickle": False,
        "quiet": True,
        **(extra_options or {}),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    rng_state = (random.getstate(), torch.get_rng_state(), _numpy_rng_state())
    try:
        run_merge(
            MergeConfiguration.model_validate(data),
            str(out_dir),
            options=MergeOptions(**options),
            config_source=yaml.safe_dump(data),
        )
    finally:
        random.setstate(rng_state[0])
        torch.set_rng_state(rng_state[1])
        _restore_numpy_rng_state(rng_state[2])
        # mergekit keeps one loader per model path for the whole process; drop them so that a later test that
        # rewrites a model at the same path cannot read a stale index or keep files open.
        cache = LoaderCache()
        cache.flush_all()
        cache.loaders.clear()
    return out_dir


def load_state(model_dir: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``model_dir``, by name (duplicate names are an error)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {model_dir}")
    state: Dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            if name in state:
                raise ValueError(f"tensor {name!r} appears in more than one file of {model_dir} ({file.name})")
            state[name] = tensor
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        listed = set(json.loads(index.read_text())["weight_map"])
        if listed != set(state):
            raise ValueError(f"{index} lists {len(listed)} tensors but the files hold {len(state)}")
    return state


def _numpy_rng_state():
    try:
        import numpy as np
    except ImportError:
        return None
    return np.random.get_state()


def _restore_numpy_rng_state(state) -> None:
    if state is not None:
        import numpy as np

        np.random.set_state(state)
