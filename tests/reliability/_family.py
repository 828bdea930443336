"""A small base + experts family on disk for the reliability tests (odd sizes, one matrix, one vector)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

MATRIX = "model.layers.0.mlp.up_proj.weight"
VECTOR = "model.norm.weight"


def make_family(root: Path, *, n_experts: int = 2, rows: int = 97, cols: int = 61,
                dtype: torch.dtype = torch.float32, seed: int = 5) -> list[Path]:
    """Write base (``m0``) + experts (``m1``..) as single-file checkpoints; returns their directories."""
    g = torch.Generator().manual_seed(seed)
    base = {"model.embed_tokens.weight": torch.randn(rows, cols, generator=g) * 0.02,
            MATRIX: torch.randn(cols, rows, generator=g) * 0.02,
            VECTOR: 1 + torch.randn(cols, generator=g) * 0.01}
    paths = []
    for i in range(n_experts + 1):
        d = root / f"m{i}"
        d.mkdir(parents=True)
        tensors = {k: (v if i == 0 else v + torch.randn(v.shape, generator=g) * 0.005).to(dtype).contiguous()
                   for k, v in base.items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        paths.append(d)
    return paths


def poke(model_dir: Path, name: str, values: dict[tuple[int, ...], float]) -> None:
    """Set elements of tensor ``name`` in ``model_dir``'s weights (e.g. to NaN/Inf), rewriting the file."""
    from safetensors.torch import load_file

    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    t = tensors[name].clone()
    for idx, v in values.items():
        t[idx] = v
    tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt"})


def linear_config(paths: list[Path]) -> dict:
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(p), "parameters": {"weight": 1.0 + i}} for i, p in enumerate(paths)]}


def ties_config(paths: list[Path], **params) -> dict:
    cfg = {"merge_method": "ties", "base_model": str(paths[0]), "dtype": "float32",
           "models": [{"model": str(p), "parameters": {"weight": 0.8, "density": 0.5}} for p in paths[1:]]}
    if params:
        cfg["parameters"] = params
    return cfg


def leftovers(root: Path) -> list[str]:
    """Names of temporary or partial output directories pymerge left in ``root``."""
    marks = (".pymerge-tmp-", ".pymerge-old-", ".pymerge-partial")
    return sorted(p.name for p in root.iterdir() if any(m in p.name for m in marks))
