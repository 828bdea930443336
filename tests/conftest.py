"""Shared fixtures: a tiny synthetic Llama family, and skips for optional reference packages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, NamedTuple

import pytest
import torch

# Test modules import `helpers.*`; make that work whatever the import mode or package layout of tests/.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from helpers.mergekit_runner import mergekit_available as _mergekit_importable  # noqa: E402


class Family(NamedTuple):
    """A generated checkpoint family: the base model directory and the expert directories."""

    base: Path
    experts: List[Path]


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> Family:
    """The "tiny" preset, base + 3 experts, float32 (generated once per test session, ~0.1 s)."""
    from pymerge.synth import PRESETS, make_family

    base, experts = make_family(
        tmp_path_factory.mktemp("tiny_family"), PRESETS["tiny"], n_experts=3, dtype=torch.float32, seed=0
    )
    return Family(base, experts)


@pytest.fixture(scope="session")
def mergekit_available() -> bool:
    """Skip the requesting test when mergekit (the reference implementation) is not installed."""
    if not _mergekit_importable():
        pytest.skip("mergekit is not installed (pip install 'pymerge[test]')")
    return True
