"""Zero-copy reader for one safetensors file: validated header, tensors as views over a private mmap.

The file is mapped with ``mmap.ACCESS_COPY`` (MAP_PRIVATE): ``torch.frombuffer`` wants a writable buffer,
and a private copy-on-write mapping gives it one while guaranteeing the file on disk can never be modified
through a view. Nothing is read eagerly; pages come in on first touch.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from pymerge.errors import CheckpointError
from pymerge.io.safetensors_format import TensorInfo, read_header


class SafetensorsFile:
    """One safetensors file: its validated tensor table and zero-copy tensor/row views."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = read_header(self.path)
        self.tensors: dict[str, TensorInfo] = header.tensors
        self.metadata: dict[str, str] | None = header.metadata
        # Validation guarantees the tensors tile the data region up to EOF, so this is the file size.
        self._file_size = max((t.end for t in self.tensors.values()), default=header.data_start)
        self._mm: mmap.mmap | None = None  # mapped on first use so opening many files is cheap

    def _map(self) -> mmap.mmap:
        if self._mm is None:
            try:
                with open(self.path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.path}: cannot memory-map file: {e}") from e
            # The header was validated against the size at open time; a file truncated since then would
            # turn into SIGBUS on access, so check again now that the mapping is fixed.
            if len(mm) < self._file_size:
                raise CheckpointError(
                    f"{self.path}: file shrank to {len(mm)} bytes since its header was read "
                    f"(needs {self._file_size})"
                )
            self._mm = mm
        return self._mm

    def info(self, name: str) -> TensorInfo:
        """The TensorInfo of tensor ``name``; CheckpointError if the file has no such tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` with its stored shape and dtype, as a zero-copy view of the file."""
        t = self.info(name)
        return self._view(t, t.begin, t.numel).reshape(t.shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 of tensor ``name`` as a zero-copy view.

        The result has shape ``(stop - start, *shape[1:])``; a 0-d tensor is one row of one element, so
        ``rows(name, 0, 1)`` of a scalar has shape ``(1,)``.
        """
        t = self.info(name)
        if not (0 <= start <= stop <= t.n_rows):
            raise CheckpointError(
                f"{self.path}: rows [{start}, {stop}) out of range for tensor {name!r} with {t.n_rows} rows"
            )
        row_numel = t.row_numel
        begin = t.begin + start * row_numel * t.itemsize
        return self._view(t, begin, (stop - start) * row_numel).reshape((stop - start, *t.shape[1:]))

    def _view(self, t: TensorInfo, begin: int, count: int) -> torch.Tensor:
        """``count`` elements of ``t``'s dtype starting at absolute byte ``begin``, flat."""
        dtype = t.torch_dtype
        if count == 0:
            # torch.frombuffer refuses count == 0; an empty tensor has no bytes to share anyway.
            return torch.empty(0, dtype=dtype)
        mm = self._map()
        # The view holds a reference to the mmap object, which keeps the mapping alive after close().
        if begin % t.itemsize != 0:
            # The mapping is page-aligned, so a file offset that is not a multiple of the itemsize gives a
            # misaligned data pointer, which kernels (and the CPU, for some instructions) cannot use.
            # Such files are legal (mixed dtypes pack without padding), so return an aligned copy instead.
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=count * t.itemsize, offset=begin)
            return raw.clone().view(dtype)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=begin)

    def byte_range(self, name: str) -> tuple[int, int]:
        """(address, length) of tensor ``name``'s bytes in this process's mapping of the file (for prefetch)."""
        t = self.info(name)
        if t.end <= t.begin:
            return 0, 0
        base = torch.frombuffer(self._map(), dtype=torch.uint8, count=1).data_ptr()
        return base + t.begin, t.end - t.begin

    def close(self) -> None:
        """Drop this object's mapping; views already handed out stay valid (they keep the mmap alive)."""
        # Never mmap.close() here: torch views do not pin the buffer export, so an explicit close would
        # unmap memory that live tensors still point into (use-after-unmap → segfault).
        self._mm = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"
