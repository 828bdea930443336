"""The README's examples stay true: its YAML parses with the config loader and its ops snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from pymerge import ops
from pymerge.config import load_config

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_yaml_example_is_a_valid_config():
    (yaml_text,) = _blocks("yaml")
    cfg = load_config(yaml_text)
    assert cfg.merge_method == "ties" and len(cfg.models) == 3 and cfg.dtype == "bfloat16"


def test_readme_commands_match_ci():
    bash = "\n".join(_blocks("bash"))
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = next(line for line in bash.splitlines() if "pytest" in line)
    assert test_cmd.strip() in ci
    assert "pymerge demo" in bash


def test_ops_snippet_runs():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(33, 17, generator=g)
    expert_a, expert_b = base + 0.1 * torch.randn(33, 17, generator=g), base + 0.1 * torch.randn(33, 17, generator=g)
    merged = ops.ties(base, [expert_a, expert_b], weights=[1.0, 0.8], densities=[0.5, 0.5])
    assert merged.shape == base.shape
    merged = ops.merge_tensors("dare_ties", [base, expert_a, expert_b], base_index=0, seed=1, name="layer0.q",
                               model_params=[{}, {"weight": 1, "density": 0.3}, {"weight": 1, "density": 0.3}])
    assert merged.shape == base.shape
    assert int(ops.topk_mask(base, k=100).sum()) == 100
