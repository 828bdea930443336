"""The safetensors file format: dtype table, tensor records, and header parsing with full validation.

Layout of a file: ``u64 little-endian header length N`` | ``N bytes of UTF-8 JSON`` | ``data region``.
The JSON maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
start of the data region) plus an optional ``"__metadata__"`` str→str map.

Validation follows the safetensors library's own checks and its list of attacks (huge header length, header
past EOF, overlapping or out-of-file offsets, holes, trailing bytes): a file that passes here can be
memory-mapped and sliced by offset without any further bounds check.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pymerge.errors import CheckpointError

# Same cap as the safetensors library: a header above this is an attack (or garbage), never a real model.
MAX_HEADER_BYTES = 100_000_000

METADATA_KEY = "__metadata__"

_MAX_TORCH_NUMEL = 2**63 - 1  # torch sizes are int64


def _build_dtype_table() -> dict[str, torch.dtype]:
    """Map each safetensors dtype name to its torch dtype, keeping only those this torch build has."""
    candidates = {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "I32": "int32",
        "U32": "uint32",
        "I64": "int64",
        "U64": "uint64",
        "F16": "float16",
        "BF16": "bfloat16",
        "F32": "float32",
        "F64": "float64",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }
    table = {}
    for st_name, torch_name in candidates.items():
        dt = getattr(torch, torch_name, None)
        if isinstance(dt, torch.dtype):
            table[st_name] = dt
    return table


ST_DTYPES: dict[str, torch.dtype] = _build_dtype_table()
ST_ITEMSIZE: dict[str, int] = {name: dt.itemsize for name, dt in ST_DTYPES.items()}
TORCH_TO_ST: dict[torch.dtype, str] = {dt: name for name, dt in ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its dtype name, shape and ABSOLUTE byte range ``[begin, end)`` in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    path: Path

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return ST_ITEMSIZE[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def n_rows(self) -> int:
        """Length of dim 0; a 0-d tensor counts as one row of one element."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        """Elements per row (product of dims 1..); 1 for 0-d and 1-d tensors."""
        return math.prod(self.shape[1:])


@dataclass(frozen=True)
class ParsedHeader:
    """A validated header: tensors in file (offset) order, metadata, and where the data region starts."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    data_start: int  # absolute offset of the data region (8 + header length)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads silently keeps the last of two equal keys; a duplicated tensor name would leave the
    # first entry's bytes unaccounted for and hide which one the writer meant, so refuse it outright.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    # bool is a subclass of int in Python; JSON true/false are not valid sizes or offsets.
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str | Path) -> ParsedHeader:
    """Read and validate the header of the safetensors file at ``path`` (no tensor bytes are read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            if file_size < 8:
                raise CheckpointError(
                    f"{path}: file is {file_size} bytes, too small for a safetensors header (needs >= 8)"
                )
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit "
                    "(corrupt or hostile file)"
                )
            if 8 + header_len > file_size:
                raise CheckpointError(
                    f"{path}: header length {header_len} runs past the end of the file ({file_size} bytes)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file: {e}") from e
    if len(raw) != header_len:  # file shrank under us
        raise CheckpointError(f"{path}: short read of header ({len(raw)} of {header_len} bytes)")
    return parse_header(raw, path=path, file_size=file_size)


def parse_header(raw: bytes, *, path: Path, file_size: int) -> ParsedHeader:
    """Validate the header bytes ``raw`` of file ``path`` (``file_size`` bytes) and return its tensors."""
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 ({e})") from e
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as e:  # JSONDecodeError and our duplicate-key error
        raise CheckpointError(f"{path}: header is not valid JSON ({e})") from e
    except RecursionError as e:  # arrays/objects nested thousands deep: the C decoder recurses per level
        raise CheckpointError(f"{path}: header JSON is nested too deeply to be a safetensors header") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: header must be a JSON object, got {type(obj).__name__}")

    metadata = obj.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path}: {METADATA_KEY} must be an object of strings")
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise CheckpointError(
                    f"{path}: {METADATA_KEY}[{k!r}] must be a string, got {type(v).__name__}"
                )

    entries: list[TensorInfo] = []
    for name, entry in obj.items():
        entries.append(_parse_entry(name, entry, path=path, data_start=data_start))

    # Contiguity: sorted by offset, tensors must tile [0, data_size) exactly — no hole (hidden bytes),
    # no overlap (two tensors aliasing the same bytes), nothing past the end of the file.
    entries.sort(key=lambda t: (t.begin, t.end))
    expected = 0
    for t in entries:
        begin, end = t.begin - data_start, t.end - data_start
        if begin < expected:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} data_offsets [{begin}, {end}] overlap the previous tensor "
                f"(which ends at {expected})"
            )
        if begin > expected:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} data_offsets [{begin}, {end}] leave a hole after byte {expected}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} data_offsets [{begin}, {end}] run past the end of the data "
                f"region ({data_size} bytes)"
            )
        expected = end
    if expected != data_size:
        raise CheckpointError(
            f"{path}: tensors cover {expected} bytes but the data region is {data_size} bytes "
            "(trailing bytes not described by the header)"
        )
    return ParsedHeader(
        tensors={t.name: t for t in entries}, metadata=metadata, data_start=data_start
    )


def _brief(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters: a hostile header can hold a million-element shape."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _bounded_numel(shape: list[int]) -> int | None:
    """The element count of ``shape``, or None when its nonzero dimensions multiply past int64.

    Zero dimensions are skipped for the bound: a zero-size tensor passes the byte-count check whatever its
    other dimensions are, but torch cannot build a shape beyond int64. Stopping at the bound also keeps a
    hostile header (millions of huge dimensions) from turning into one enormous big-integer product.
    """
    n, empty = 1, False
    for d in shape:
        if d == 0:
            empty = True
            continue
        n *= d
        if n > _MAX_TORCH_NUMEL:
            return None
    return 0 if empty else n


def _parse_entry(name: str, entry: Any, *, path: Path, data_start: int) -> TensorInfo:
    """Validate one header entry and return its TensorInfo with absolute offsets."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry must be an object, got {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise CheckpointError(f"{where}: missing {key!r}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise CheckpointError(
            f"{where}: unknown or unsupported dtype {_brief(dtype)} (supported: {', '.join(sorted(ST_DTYPES))})"
        )
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_brief(shape)}")
    numel = _bounded_numel(shape)
    if numel is None:
        raise CheckpointError(f"{where}: shape {_brief(shape)} is larger than a tensor can be (2**63 - 1 elements)")
    offsets = entry["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
    ):
        raise CheckpointError(
            f"{where}: data_offsets must be [begin, end] of non-negative integers, got {_brief(offsets)}"
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] have begin > end")
    nbytes = numel * ST_ITEMSIZE[dtype]
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but shape {_brief(shape)} of "
            f"{dtype} needs {nbytes}"
        )
    return TensorInfo(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        begin=data_start + begin,
        end=data_start + end,
        path=path,
    )
