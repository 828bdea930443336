"""Disk space: refuse a merge that cannot fit before writing, and turn a disk that fills up anyway into one error.

The shards are created sparse (``ftruncate`` to their final size), so the filesystem reserves nothing up front
and running out of space shows up as ENOSPC from a ``pwrite`` (or EIO/ENOSPC from ``fsync`` on filesystems
with delayed allocation) in the middle of a merge. ``GuardedWriter`` turns those into a ``MergeError`` that
names the file and how much was left to write; the caller's atomic output directory then removes the rest.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from pymerge.errors import MergeError
from pymerge.io.safetensors_writer import ShardedWriter, ShardLayout

# Room for what is written besides the shards: config.json, README.md, the config copy, the manifest, the
# index, and filesystem block rounding of each file. Tokenizer files are counted by their actual size.
EXTRAS_MARGIN = 4 * 2**20

# Errors that mean "the disk cannot take these bytes" rather than a bug: full, over quota, too big, I/O error.
DISK_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG, errno.EIO) if e)


def planned_bytes(shards: list[ShardLayout], extra_files: list[Path] = ()) -> int:
    """Bytes the output will occupy: every shard's full size, ``extra_files`` as they are, plus a margin."""
    total = sum(s.file_size for s in shards) + EXTRAS_MARGIN
    for f in extra_files:
        try:
            total += f.stat().st_size
        except OSError:
            pass  # a file that cannot be read is reported when it is copied
    return total


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (the output's parent may not have been created yet)."""
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_free_space(out_dir: str | Path, needed: int) -> None:
    """MergeError if the filesystem that will hold ``out_dir`` has fewer than ``needed`` bytes free."""
    out = Path(out_dir).absolute()
    where = _existing_ancestor(out.parent)
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return  # cannot tell (odd filesystem); the write itself will still report a full disk
    if free < needed:
        raise MergeError(f"not enough free space for {out}: the merge writes {_fmt(needed)} but {where} has "
                         f"{_fmt(free)} available (free some space, choose another output directory, or skip "
                         "this check with check_space=False / --no-space-check)")


def disk_error(exc: OSError, path: Path | str, remaining: int) -> MergeError:
    """The one-line MergeError for a write to ``path`` that failed with ``exc`` while ``remaining`` bytes were
    still to be written."""
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    code = f" ({code})" if code else ""
    return MergeError(f"writing {path} failed: {reason}{code}; {_fmt(remaining)} of output still to write")


class GuardedWriter:
    """A ``ShardedWriter`` whose disk-full / I/O errors become a ``MergeError`` naming the file and the bytes
    still to write. It counts the tensor bytes written so far for that message."""

    def __init__(self, writer: ShardedWriter, shown_dir: Path | None = None):
        # Errors name files under ``shown_dir`` (the final output path) rather than the temporary directory
        # they are really in, which is gone by the time the user reads the message.
        self.writer = writer
        self.shown_dir = Path(shown_dir) if shown_dir is not None else writer.directory
        self._file_of = {t.name: self.shown_dir / s.filename for s in writer.shards for t in s.tensors}
        self.total = sum(s.file_size for s in writer.shards)
        self.written = sum(8 + len(s.header) for s in writer.shards)  # the headers went out in the constructor

    @property
    def remaining(self) -> int:
        return max(self.total - self.written, 0)

    def write(self, name: str, data: torch.Tensor, row_start: int = 0) -> None:
        """``ShardedWriter.write``, with OSErrors of a full or failing disk turned into a MergeError."""
        try:
            self.writer.write(name, data, row_start)
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            raise disk_error(e, self._file_of.get(name, self.shown_dir), self.remaining) from e
        self.written += data.numel() * data.element_size()

    def close(self) -> None:
        """``ShardedWriter.close`` (completeness check and fsync), with a failing fsync reported the same way."""
        try:
            self.writer.close()
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            # Data reached the page cache but not the disk: all of it may be lost, so say so.
            raise disk_error(e, self.shown_dir, self.total) from e

    def abort(self) -> None:
        self.writer.abort()


def _fmt(n: int) -> str:
    """Bytes as an exact count plus a human-readable size: ``'5368709120 bytes (5.00 GiB)'``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n} bytes ({n / size:.2f} {unit})"
    return f"{n} bytes"
