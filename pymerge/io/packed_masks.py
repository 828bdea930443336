"""Packed per-task binary masks in one safetensors file: 1 bit per parameter per task, plus per-task rescalers.

File layout (a valid safetensors file; any safetensors reader opens it):
  * for every model tensor ``name`` of ``numel`` elements: a U8 tensor ``name`` of shape ``[T, ceil(numel/8)]``;
    row t holds task t's mask of the tensor flattened in row-major (C) order, 8 elements per byte, LITTLE-endian
    bit order: element ``8*i + j`` is bit ``j`` (value ``1 << j``) of byte ``i``; the padding bits of the last
    byte are 0. (``numpy.packbits(mask, bitorder="little")`` writes the same bytes.)
  * ``pymerge.rescalers``: F64 ``[T]``, the factor r_t of task t (1 for TALL masks).
  * ``__metadata__`` (all strings): ``format`` = "pymerge.packed_masks", ``format_version`` = "1", ``method``,
    ``tasks`` (JSON list of task labels, row order), ``shapes`` (JSON object: tensor name -> original shape),
    ``bit_order`` = "little", ``base_model`` (path of theta_0 when built), ``params`` / ``task_params`` (JSON of the
    resolved parameters of the first tensor), and ``reconstruct`` (the formula, for humans).

A task's tensor is rebuilt as ``theta_0 + r_t * m_t * (merged - theta_0)`` (see pymerge.masks).
The writer fills a file whose layout is fixed up front, by offset, in a hidden temporary file next to the target,
then fsyncs and renames it into place: the target path holds a complete file or nothing.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, MergeError
from .direct_write import pwrite_all
from .safetensors_reader import SafetensorsFile
from .safetensors_writer import plan_shards

FORMAT = "pymerge.packed_masks"
FORMAT_VERSION = "1"
RESCALERS = "pymerge.rescalers"

# popcount of every byte value (numpy < 2.0 has no bitwise_count)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def packed_nbytes(numel: int) -> int:
    """Bytes holding ``numel`` bits."""
    return (numel + 7) // 8


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [..., ceil(n/8)]: the bool [..., n] ``bits`` packed 8 per byte, little-endian bit order, zero padded."""
    arr = bits.to(torch.bool).contiguous().numpy()
    return torch.from_numpy(np.packbits(arr, axis=-1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """bool [..., n]: the first ``n`` bits of uint8 [..., bytes] ``packed`` (little-endian bit order)."""
    if packed.dtype != torch.uint8:
        raise MergeError(f"packed masks must be uint8, got {packed.dtype}")
    if packed.shape[-1] * 8 < n:
        raise MergeError(f"{packed.shape[-1]} packed bytes hold {packed.shape[-1] * 8} bits, fewer than {n}")
    bits = np.unpackbits(packed.contiguous().numpy(), axis=-1, count=n, bitorder="little")
    return torch.from_numpy(bits).to(torch.bool)


def count_ones(packed: torch.Tensor) -> list[int]:
    """Set bits of each row of uint8 [rows, bytes] ``packed``."""
    return [int(c) for c in _POPCOUNT[packed.numpy()].sum(axis=-1)]


class TensorBits:
    """Appends one tensor's masks chunk by chunk ([T, m] bools in flat order); bits that do not fill a byte wait
    for the next chunk, so chunks may start anywhere."""

    def __init__(self, writer: "PackedMasksWriter", name: str, numel: int, abs_offset: int):
        self.writer, self.name, self.numel, self.abs_offset = writer, name, numel, abs_offset
        self.row_bytes = packed_nbytes(numel)
        self.seen = 0
        self.byte_pos = 0
        self.carry = torch.zeros(writer.n_tasks, 0, dtype=torch.bool)
        self.ones = [0] * writer.n_tasks  # set bits per task so far

    def add(self, bits: torch.Tensor) -> None:
        if bits.dim() != 2 or bits.shape[0] != self.writer.n_tasks:
            raise MergeError(f"masks of '{self.name}': expected [{self.writer.n_tasks}, m] bits, got "
                             f"{list(bits.shape)}")
        self.seen += bits.shape[1]
        if self.seen > self.numel:
            raise MergeError(f"masks of '{self.name}': {self.seen} bits given for {self.numel} elements")
        allbits = torch.cat([self.carry, bits.to(torch.bool)], dim=1) if self.carry.shape[1] else bits
        full = allbits.shape[1] // 8 * 8
        self.carry = allbits[:, full:].clone()
        if full:
            self._write(pack_bits(allbits[:, :full]))

    def close(self) -> None:
        if self.seen != self.numel:
            raise MergeError(f"masks of '{self.name}': {self.seen} of {self.numel} elements written")
        if self.carry.shape[1]:
            self._write(pack_bits(self.carry))
            self.carry = self.carry[:, :0]
        if self.byte_pos != self.row_bytes:  # pragma: no cover - guarded by the counts above
            raise MergeError(f"masks of '{self.name}': {self.byte_pos} of {self.row_bytes} bytes written")

    def _write(self, packed: torch.Tensor) -> None:
        packed = packed.contiguous()
        self.ones = [a + b for a, b in zip(self.ones, count_ones(packed))]
        for t in range(packed.shape[0]):
            self.writer.pwrite(packed[t].numpy().tobytes(), self.abs_offset + t * self.row_bytes + self.byte_pos)
        self.byte_pos += packed.shape[1]


class PackedMasksWriter:
    """Writes a packed-masks file atomically: ``tensor(name)`` per model tensor in order, then ``commit``."""

    def __init__(self, path: str | Path, tasks: list[str], shapes: list[tuple[str, tuple[int, ...]]],
                 metadata: dict[str, str], *, overwrite: bool = False):
        self.final = Path(path).absolute()
        if self.final.is_dir():
            raise MergeError(f"masks output {self.final} is a directory; give a file path (e.g. masks.safetensors)")
        if self.final.exists() and not overwrite:
            raise MergeError(f"masks output {self.final} exists (pass overwrite to replace it)")
        if len(set(tasks)) != len(tasks) or not tasks:
            raise MergeError(f"masks need distinct task names, got {tasks}")
        self.n_tasks = len(tasks)
        names = [n for n, _ in shapes]
        if RESCALERS in names:
            raise MergeError(f"model tensor name {RESCALERS!r} is reserved by the packed-masks format")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "bit_order": "little",
                "tasks": json.dumps(tasks), "shapes": json.dumps({n: list(s) for n, s in shapes}), **metadata}
        self.layout = plan_shards([(n, "U8", (self.n_tasks, packed_nbytes(math.prod(s)))) for n, s in shapes]
                                  + [(RESCALERS, "F64", (self.n_tasks,))], 1 << 62, meta)[0]
        self.shapes = dict(shapes)
        self._offsets = {t.name: 8 + len(self.layout.header) + t.offset for t in self.layout.tensors}
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.final.parent / f".{self.final.name}.pymerge-tmp-{secrets.token_hex(6)}"
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                                      0o644)
        self._done: set[str] = set()
        try:
            os.ftruncate(self.fd, self.layout.file_size)
            self.pwrite(len(self.layout.header).to_bytes(8, "little") + self.layout.header, 0)
        except BaseException:
            self.abort()
            raise

    @property
    def file_size(self) -> int:
        return self.layout.file_size

    def pwrite(self, data: bytes, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def tensor(self, name: str) -> TensorBits:
        """The bit appender of model tensor ``name`` (each tensor once)."""
        if name not in self.shapes or name in self._done:
            raise MergeError(f"masks of '{name}': not in the layout or already written")
        self._done.add(name)
        return TensorBits(self, name, math.prod(self.shapes[name]), self._offsets[name])

    def commit(self, rescalers: list[float]) -> Path:
        """Write the rescalers, check every tensor was written, fsync, and rename into place."""
        if len(rescalers) != self.n_tasks:
            raise MergeError(f"{len(rescalers)} rescalers for {self.n_tasks} tasks")
        missing = [n for n in self.shapes if n not in self._done]
        if missing:
            raise MergeError(f"masks of {len(missing)} tensors were not written (first: '{missing[0]}')")
        self.pwrite(torch.tensor(rescalers, dtype=torch.float64).numpy().tobytes(), self._offsets[RESCALERS])
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.tmp, self.final)
        dfd = os.open(self.final.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)  # make the rename durable
        finally:
            os.close(dfd)
        return self.final

    def abort(self) -> None:
        """Close and delete the temporary file (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


class PackedMasks:
    """A validated packed-masks file: tasks, method, original shapes, rescalers, and each task's masks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"masks file {self.path} does not exist")
        self.file = SafetensorsFile(self.path)
        meta = self.file.metadata or {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.path}: not a packed-masks file (metadata format is "
                                  f"{meta.get('format')!r}, expected {FORMAT!r}); build one with "
                                  "`pymerge masks build`")
        if meta.get("format_version") != FORMAT_VERSION or meta.get("bit_order") != "little":
            raise CheckpointError(f"{self.path}: packed-masks format_version {meta.get('format_version')!r} / "
                                  f"bit_order {meta.get('bit_order')!r}; this pymerge reads version "
                                  f"{FORMAT_VERSION}, little")
        self.metadata = meta
        self.method = meta.get("method", "")
        self.tasks: list[str] = self._json("tasks", list)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks) or not all(isinstance(t, str) for t in self.tasks):
            raise CheckpointError(f"{self.path}: metadata 'tasks' must be a list of distinct names, got {self.tasks}")
        shapes = self._json("shapes", dict)
        self.shapes: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise CheckpointError(f"{self.path}: metadata shape of '{name}' is {shape!r}, expected a list of sizes")
            self.shapes[name] = tuple(shape)
        want = set(self.shapes) | {RESCALERS}
        have = set(self.file.tensors)
        if want != have:
            extra, missing = sorted(have - want), sorted(want - have)
            raise CheckpointError(f"{self.path}: tensors do not match the metadata shapes (missing: {missing[:5]}, "
                                  f"unexpected: {extra[:5]})")
        T = len(self.tasks)
        for name, shape in self.shapes.items():
            info = self.file.info(name)
            expect = (T, packed_nbytes(math.prod(shape)))
            if info.dtype != "U8" or tuple(info.shape) != expect:
                raise CheckpointError(f"{self.path}: masks of '{name}' are {info.dtype} {list(info.shape)}, expected "
                                      f"U8 {list(expect)} for {T} tasks and shape {list(shape)}")
        info = self.file.info(RESCALERS)
        if info.dtype != "F64" or tuple(info.shape) != (T,):
            raise CheckpointError(f"{self.path}: {RESCALERS} is {info.dtype} {list(info.shape)}, expected F64 [{T}]")
        self.rescalers: list[float] = [float(x) for x in self.file.tensor(RESCALERS)]

    def _json(self, key: str, kind: type):
        raw = self.metadata.get(key)
        try:
            value = json.loads(raw) if raw is not None else None
        except ValueError:
            value = None
        if not isinstance(value, kind):
            raise CheckpointError(f"{self.path}: metadata '{key}' must be a JSON {kind.__name__}, got {raw!r}")
        return value

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("base_model") or None

    def task_index(self, task: str | int) -> int:
        """Row of ``task``: its label, the last path component of a unique label, or a position (int or digits)."""
        if isinstance(task, int) and not isinstance(task, bool):
            if 0 <= task < len(self.tasks):
                return task
        elif task in self.tasks:
            return self.tasks.index(task)
        elif isinstance(task, str):
            short = [i for i, t in enumerate(self.tasks) if Path(t).name == task.rstrip("/")]
            if len(short) == 1:
                return short[0]
            if task.isdigit() and int(task) < len(self.tasks):
                return int(task)
        raise MergeError(f"{self.path}: unknown task {task!r}; the masks hold tasks {self.tasks} "
                         f"(a label, its last path component, or a position 0..{len(self.tasks) - 1})")

    def mask(self, name: str, task: str | int) -> torch.Tensor:
        """bool tensor of the original shape: task ``task``'s mask of tensor ``name``."""
        if name not in self.shapes:
            raise MergeError(f"{self.path}: no masks for tensor '{name}'")
        t = self.task_index(task)
        shape = self.shapes[name]
        return unpack_bits(self.file.tensor(name)[t], math.prod(shape)).reshape(shape)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "PackedMasks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
