"""Per-model statistics files for data-informed merges, validated against the model they describe.

Two kinds, both safetensors files keyed by the model's own tensor names:
  fisher  one diagonal Fisher tensor per model tensor, with that tensor's shape (Fisher merging);
  gram    for a 2-D linear weight ``W`` (out x in), the input Gram matrix ``X^T X / n``, shape in x in
          (RegMean); weights without an entry are merged by plain averaging.

Opening a file validates its header (the project's safetensors reader) and then every entry against the
model's tensor shapes: a name that is no tensor of the model, a wrong shape or a non-float dtype is a
``CheckpointError`` naming the file, the tensor, and the expected and found shapes. Nothing but headers is
read here; tensors are handed out as zero-copy views of the memory map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import torch

from pymerge.errors import CheckpointError
from pymerge.io.safetensors_reader import SafetensorsFile

FISHER = "fisher"
GRAM = "gram"
KINDS = (FISHER, GRAM)
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_WHAT = {FISHER: "Fisher", GRAM: "Gram"}


def expected_shape(kind: str, tensor_shape: Sequence[int]) -> tuple[int, ...] | None:
    """The shape a statistic of ``kind`` must have for a model tensor of ``tensor_shape`` (None: not allowed)."""
    shape = tuple(int(s) for s in tensor_shape)
    if kind == FISHER:
        return shape
    if kind == GRAM:
        return (shape[1], shape[1]) if len(shape) == 2 else None
    raise ValueError(f"unknown statistics kind {kind!r} (expected one of {KINDS})")


def resolve_path(value: str | Path, base_dir: str | Path | None) -> Path:
    """Where a configured statistics path points: as given, else relative to ``base_dir`` (the config's
    directory), like model paths. CheckpointError listing both places when neither exists."""
    path = Path(value).expanduser()
    tried = [path]
    if not path.is_absolute() and base_dir is not None:
        tried.append(Path(base_dir) / path)
    for p in tried:
        if p.is_file():
            return p
    raise CheckpointError(f"statistics file '{value}' not found (looked at {', '.join(str(p) for p in tried)})")


class StatisticsFile:
    """One model's statistics of one kind, validated against that model's tensor shapes."""

    def __init__(self, path: str | Path, kind: str, model: str, shapes: Mapping[str, Sequence[int]]):
        if kind not in KINDS:
            raise ValueError(f"unknown statistics kind {kind!r} (expected one of {KINDS})")
        self.path = Path(path)
        self.kind = kind
        self.model = model
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: {_WHAT[kind]} statistics file for model '{model}' does not exist")
        self._file = SafetensorsFile(self.path)
        for name, info in self._file.tensors.items():
            self._check_entry(name, info.dtype, info.shape, shapes)

    def _check_entry(self, name: str, dtype: str, shape: Sequence[int], shapes: Mapping[str, Sequence[int]]):
        what = _WHAT[self.kind]
        if name not in shapes:
            raise CheckpointError(f"{self.path}: {what} entry '{name}' matches no tensor of model '{self.model}' "
                                  "(statistics must use the model's tensor names; is this another model's file?)")
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: {what} entry '{name}' has dtype {dtype}, expected a float dtype "
                                  f"({', '.join(_FLOAT_DTYPES)})")
        want = expected_shape(self.kind, shapes[name])
        if want is None:
            raise CheckpointError(f"{self.path}: Gram entry '{name}': tensor '{name}' of model '{self.model}' has "
                                  f"shape {list(shapes[name])}; Gram matrices are only for 2-D linear weights")
        if tuple(shape) != want:
            raise CheckpointError(f"{self.path}: {what} entry '{name}' of model '{self.model}' has shape "
                                  f"{list(shape)}, expected {list(want)} (model tensor shape {list(shapes[name])})")

    def names(self) -> list[str]:
        return list(self._file.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._file.tensors

    def get(self, name: str) -> torch.Tensor | None:
        """The statistic of model tensor ``name`` as a zero-copy view (stored dtype), None when absent."""
        return self._file.tensor(name) if name in self._file.tensors else None

    def for_tensor(self, name: str) -> torch.Tensor | None:
        """The statistic a merge of tensor ``name`` uses: a Fisher file must hold every merged tensor
        (CheckpointError otherwise); a Gram file may leave tensors out (None: averaged)."""
        t = self.get(name)
        if t is None and self.kind == FISHER:
            raise CheckpointError(f"{self.path}: no Fisher entry for tensor '{name}' of model '{self.model}' "
                                  "(a Fisher file needs one entry per merged tensor, same name and shape)")
        return t

    def close(self) -> None:
        self._file.close()

    def __repr__(self) -> str:
        return f"StatisticsFile({str(self.path)!r}, {self.kind}, model={self.model!r})"


class StatisticsReader:
    """Opens each configured statistics file once per (file, kind, model) and looks tensors up in it."""

    def __init__(self, base_dir: str | Path | None = None):
        self.base_dir = base_dir
        self._open: dict[tuple[Path, str, str], StatisticsFile] = {}

    def open(self, value: str | Path, kind: str, model: str,
             shapes: Mapping[str, Sequence[int]]) -> StatisticsFile:
        path = resolve_path(value, self.base_dir)
        key = (path.resolve(), kind, model)
        if key not in self._open:
            self._open[key] = StatisticsFile(path, kind, model, shapes)
        return self._open[key]

    def for_tensor(self, value: str | Path | None, kind: str, model: str, shapes: Mapping[str, Sequence[int]],
                   tensor_name: str) -> torch.Tensor | None:
        """Statistic of ``tensor_name`` from the file ``value`` configured for ``model`` (None when no file)."""
        if value is None:
            return None
        return self.open(value, kind, model, shapes).for_tensor(tensor_name)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()
