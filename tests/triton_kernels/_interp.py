"""Imports the Triton op modules so that they run here: on the GPU when torch sees one, else in Triton's
interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before the kernels are decorated, so modules
imported earlier without it are reloaded, the shared device helpers first)."""

from __future__ import annotations

import importlib
import os

import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def load(*names: str):
    """The modules pymerge.triton_kernels.<name>, decorated for this machine (GPU or interpreter)."""
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    common = importlib.import_module("pymerge.triton_kernels._common")
    reload = not ON_GPU and not isinstance(common.to_bf16_rne, _interpreted_function())
    if reload:
        common = importlib.reload(common)
    mods = []
    for name in names:
        mod = importlib.import_module(f"pymerge.triton_kernels.{name}")
        mods.append(importlib.reload(mod) if reload or not _interpreted_ok(mod) else mod)
    return mods[0] if len(mods) == 1 else mods


def _interpreted_function() -> type:
    # The submodule must be imported by name: `import triton` alone does not bind triton.runtime.interpreter
    # (seen with triton 3.6 on a GPU machine, where nothing else had imported it).
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction


def _interpreted_ok(mod) -> bool:
    if ON_GPU:
        return True
    return all(isinstance(v, _interpreted_function())
               for k, v in vars(mod).items() if k.startswith("_") and k.endswith("_kernel"))


def int_view(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Every element has the same bits (NaN compared as NaN: payloads are not reproducible)."""
    import pytest

    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    same = (int_view(got) == int_view(want)) | (torch.isnan(got) & torch.isnan(want))
    if not bool(same.all()):
        i = int((~same).reshape(-1).nonzero()[0])
        pytest.fail(f"{what}: {int((~same).sum())} of {got.numel()} elements differ; first at {i}: got "
                    f"{got.reshape(-1)[i].item()!r}, want {want.reshape(-1)[i].item()!r}")
