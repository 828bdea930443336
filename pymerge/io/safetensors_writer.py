"""Sharded safetensors output with a layout fixed up front, written at offsets as tensors (or rows) finish.

``plan_shards`` decides every shard's name, header and tensor offsets from names/dtypes/shapes alone, so the
executor can write any tensor — or any range of its rows — in any order with ``pwrite``, and never holds an
output tensor in memory just to serialize it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pymerge.errors import MergeError
from pymerge.io.direct_write import OutputFile, pwrite_all
from pymerge.io.safetensors_format import METADATA_KEY, ST_DTYPES, ST_ITEMSIZE

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class OutTensor:
    """One output tensor: name, safetensors dtype, shape, and byte offset relative to the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_ITEMSIZE[self.dtype]

    @property
    def n_rows(self) -> int:
        """Length of dim 0; a 0-d tensor is one row of one element."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:])


@dataclass
class ShardLayout:
    """One output file: its name, tensors with offsets, the padded header bytes, and the data size.

    The file is ``8-byte LE header length | header | data_size bytes of data``.
    """

    filename: str
    tensors: list[OutTensor]
    header: bytes
    data_size: int

    @property
    def file_size(self) -> int:
        return 8 + len(self.header) + self.data_size


def shard_filename(i: int, n: int) -> str:
    """The Hugging Face name of shard ``i`` (0-based) of ``n``."""
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def plan_shards(
    tensors: list[tuple[str, str, tuple[int, ...]]],
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> list[ShardLayout]:
    """Pack ``(name, dtype, shape)`` tensors, in order, into shards of at most ``max_shard_bytes`` of data.

    Greedy: a tensor goes into the current shard if it fits, else starts a new one; a tensor larger than
    the cap gets a shard of its own. Returns the shards with names, offsets and headers fixed.
    """
    if max_shard_bytes <= 0:
        raise MergeError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    meta = {"format": "pt"} if metadata is None else dict(metadata)
    # transformers refuses safetensors files whose metadata lacks a known "format".
    meta.setdefault("format", "pt")
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise MergeError(f"safetensors metadata must map str to str, got {k!r}: {v!r}")

    groups: list[list[OutTensor]] = []
    seen: set[str] = set()
    used = 0
    for name, dtype, shape in tensors:
        if name in seen:
            raise MergeError(f"output tensor {name!r} is listed twice")
        if name == METADATA_KEY:
            raise MergeError(f"output tensor name {METADATA_KEY!r} is reserved by safetensors")
        if dtype not in ST_DTYPES:
            raise MergeError(f"output tensor {name!r}: unknown dtype {dtype!r}")
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise MergeError(f"output tensor {name!r}: negative dimension in shape {shape}")
        seen.add(name)
        t = OutTensor(name, dtype, shape)
        # A new group is only opened for a tensor, so an oversized tensor never leaves an empty shard behind.
        if not groups or used + t.nbytes > max_shard_bytes:
            groups.append([])
            used = 0
        t.offset = used
        groups[-1].append(t)
        used += t.nbytes
    if not groups:
        groups.append([])  # an empty model still gets one (empty) file

    shards = []
    for i, group in enumerate(groups):
        header = _header_bytes(group, meta)
        data_size = sum(t.nbytes for t in group)
        shards.append(ShardLayout(shard_filename(i, len(groups)), group, header, data_size))
    return shards


def _header_bytes(group: list[OutTensor], meta: dict[str, str]) -> bytes:
    """The JSON header for ``group``, space-padded to a multiple of 8 so the data region starts aligned."""
    obj: dict[str, object] = {METADATA_KEY: meta}
    for t in group:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.offset, t.offset + t.nbytes]}
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


@dataclass
class _Slot:
    """Where one tensor goes, which of its rows have been written so far, and the sha256 of the bytes written,
    kept while the rows arrive in order (``hashed_rows`` is then the count; -1 once they did not)."""

    file: OutputFile
    filename: str
    tensor: OutTensor
    abs_offset: int  # absolute file offset of the tensor's first byte
    done: list[tuple[int, int]] = field(default_factory=list)  # disjoint sorted [start, stop) row ranges
    hasher: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    hashed_rows: int = 0

    def covered_rows(self) -> int:
        return sum(b - a for a, b in self.done)

    def mark(self, start: int, stop: int) -> None:
        """Add rows [start, stop) to the written set, merging overlapping/adjacent ranges."""
        if start == stop:
            return
        merged = []
        for a, b in sorted([*self.done, (start, stop)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.done = merged

    def complete(self) -> bool:
        n = self.tensor.n_rows
        if self.tensor.nbytes == 0:
            return True  # nothing to write; the header alone describes it
        return self.done == [(0, n)]


class ShardedWriter:
    """Writes the shards of a precomputed layout into ``directory`` by offset, in any order, thread-safely.

    With ``resume``, shard files already in ``directory`` (from an interrupted run) are reopened without
    truncation, so the tensors written before stay in place; ``mark_written`` then counts them as done.

    Each tensor's sha256 is computed from the bytes as they are written, while its rows arrive in order (the
    executor writes them so): ``digest(name)`` gives it, so the journal does not read the output back. The
    files are written through ``io.direct_write.OutputFile`` (``O_DIRECT`` where the filesystem has it).
    """

    def __init__(self, directory: Path, shards: list[ShardLayout], *, resume: bool = False):
        self.directory = Path(directory)
        self.shards = shards
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._files: list[OutputFile] = []
        self._hasher: ThreadPoolExecutor | None = None
        self._slots: dict[str, _Slot] = {}
        self._closed = False
        try:
            for shard in shards:
                f = OutputFile(self.directory / shard.filename, truncate=not resume)
                self._files.append(f)
                # Full size up front: the file is sparse until written, and every pwrite lands inside it. On
                # resume this also cuts anything past the layout's end and keeps every byte inside it.
                os.ftruncate(f.fd, shard.file_size)
                pwrite_all(f.fd, len(shard.header).to_bytes(8, "little") + shard.header, 0)
                data_start = 8 + len(shard.header)
                for t in shard.tensors:
                    if t.name in self._slots:
                        raise MergeError(f"output tensor {t.name!r} appears in two shards")
                    self._slots[t.name] = _Slot(f, shard.filename, t, data_start + t.offset)
        except BaseException:
            self._close_files()
            raise

    def write(self, name: str, data: torch.Tensor, row_start: int = 0) -> None:
        """Write ``data`` as rows ``[row_start, row_start + k)`` of output tensor ``name``.

        ``data`` is a contiguous CPU tensor of the declared dtype, shaped ``(k, *shape[1:])`` (the full shape
        for a whole 0-d tensor) or flat with a multiple of the row size elements.
        """
        slot = self._slots.get(name)
        if slot is None:
            raise MergeError(f"output tensor {name!r} is not in the output layout")
        t = slot.tensor
        want = ST_DTYPES[t.dtype]
        if data.dtype != want:
            raise MergeError(f"output tensor {name!r}: got dtype {data.dtype}, layout says {want} ({t.dtype})")
        if data.device.type != "cpu":
            raise MergeError(f"output tensor {name!r}: data must be on the CPU, got {data.device}")
        if not data.is_contiguous():
            raise MergeError(f"output tensor {name!r}: data must be contiguous")
        k = self._row_count(t, data)
        if row_start < 0 or row_start + k > t.n_rows:
            raise MergeError(
                f"output tensor {name!r}: rows [{row_start}, {row_start + k}) out of range for "
                f"{t.n_rows} rows (shape {t.shape})"
            )
        row_bytes = t.row_numel * ST_ITEMSIZE[t.dtype]
        with self._lock:
            if self._closed:
                raise MergeError(f"output tensor {name!r}: writer is already closed")
            self._in_flight += 1  # close() waits for this, so the fd cannot be closed (and reused) under us
        ok = False
        try:
            if data.numel():
                # A byte view of the tensor's own memory: no copy on the way to pwrite.
                buf = memoryview(data.reshape(-1).view(torch.uint8).numpy())
                # The hash runs on its own thread while this one waits for the disk (hashlib and pwrite both
                # let go of the GIL): on a 1B ties merge the writes took 1.3 s and the hashes 1.2 s.
                hashing = self._hash_pool().submit(slot.hasher.update, buf) if slot.hashed_rows == row_start else None
                try:
                    slot.file.pwrite(buf, slot.abs_offset + row_start * row_bytes)
                finally:
                    if hashing is not None:
                        hashing.result()
            ok = True
        finally:
            with self._lock:
                if ok:
                    slot.hashed_rows = slot.hashed_rows + k if slot.hashed_rows == row_start else -1
                    slot.mark(row_start, row_start + k)
                self._in_flight -= 1
                self._idle.notify_all()

    def _hash_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymerge-hash")
            return self._hasher

    @staticmethod
    def _row_count(t: OutTensor, data: torch.Tensor) -> int:
        """How many rows of ``t`` the tensor ``data`` holds; MergeError if its shape does not fit."""
        if tuple(data.shape) == t.shape:
            return t.n_rows
        if data.dim() >= 1 and len(t.shape) >= 1 and tuple(data.shape[1:]) == t.shape[1:]:
            return data.shape[0]
        if data.dim() == 1 and t.row_numel > 0 and data.numel() % t.row_numel == 0:
            return data.numel() // t.row_numel
        raise MergeError(
            f"output tensor {t.name!r}: data of shape {tuple(data.shape)} is not a whole number of rows of "
            f"shape {t.shape}"
        )

    def mark_written(self, name: str) -> None:
        """Count every row of ``name`` as written without writing it (its bytes are already in the file)."""
        slot = self._slots.get(name)
        if slot is None:
            raise MergeError(f"output tensor {name!r} is not in the output layout")
        with self._lock:
            slot.mark(0, slot.tensor.n_rows)

    def digest(self, name: str) -> str | None:
        """The hex sha256 of ``name``'s bytes when this writer wrote all of them in row order, else None (the
        caller then reads them back)."""
        slot = self._slots.get(name)
        if slot is None:
            raise MergeError(f"output tensor {name!r} is not in the output layout")
        with self._lock:
            if slot.tensor.nbytes == 0 or slot.hashed_rows == slot.tensor.n_rows:
                return slot.hasher.hexdigest()
        return None

    def is_complete(self, name: str) -> bool:
        """Whether every row of ``name`` has been written."""
        with self._lock:
            return self._slots[name].complete()

    def missing(self) -> list[str]:
        """Names of tensors not yet fully written, in layout order."""
        with self._lock:
            return [n for n, s in self._slots.items() if not s.complete()]

    @property
    def written_fraction(self) -> float:
        """Fraction of all output tensor bytes written so far (1.0 for an all-empty layout)."""
        with self._lock:
            total = sum(s.tensor.nbytes for s in self._slots.values())
            done = sum(
                s.covered_rows() * s.tensor.row_numel * ST_ITEMSIZE[s.tensor.dtype] for s in self._slots.values()
            )
        return 1.0 if total == 0 else done / total

    def write_index(self) -> Path | None:
        """Write ``model.safetensors.index.json`` (total_size + weight_map) when there is more than one shard."""
        if len(self.shards) <= 1:
            return None
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s.tensors)},
            "weight_map": {t.name: s.filename for s in self.shards for t in s.tensors},
        }
        path = self.directory / INDEX_NAME
        with open(path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        return path

    def close(self) -> None:
        """Check every tensor was fully written (MergeError naming the first missing one), fsync, close."""
        with self._lock:
            if self._closed:
                return
            self._closed = True  # refuse new writes, then let those in flight finish before checking
            self._idle.wait_for(lambda: self._in_flight == 0)
        try:
            missing = self.missing()
            if missing:
                slot = self._slots[missing[0]]
                raise MergeError(
                    f"output tensor {missing[0]!r} in {slot.filename} was not fully written "
                    f"({slot.covered_rows()} of {slot.tensor.n_rows} rows; {len(missing)} tensors incomplete)"
                )
            for f in self._files:
                os.fsync(f.fd)
        finally:
            self._close_files()

    def abort(self) -> None:
        """Close the files without checking or syncing (the output is being thrown away)."""
        self._close_files()

    def _close_files(self) -> None:
        with self._lock:
            self._closed = True
            self._idle.wait_for(lambda: self._in_flight == 0)
            files, self._files = self._files, []
            pool, self._hasher = self._hasher, None
        for f in files:
            f.close()
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

