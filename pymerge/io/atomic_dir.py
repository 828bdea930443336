"""An output directory that appears complete or not at all: write into a hidden sibling, rename at the end.

The temporary directory lives next to the final path (same filesystem), so the final ``rename`` is atomic: a
crash or an error leaves either the old state or the finished output, never a half-written model.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from pymerge.errors import MergeError


def _fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    flags = os.O_RDONLY
    if path.is_dir():
        flags |= getattr(os, "O_DIRECTORY", 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (directories after their contents)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for fn in filenames:
            p = Path(dirpath) / fn
            if p.is_file() and not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _remove(path: Path) -> None:
    """Remove a file, symlink or directory tree at ``path`` if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


class AtomicOutputDir:
    """A temporary directory ``path`` that ``commit()`` renames to ``final`` atomically."""

    def __init__(self, final: str | Path, *, overwrite: bool = False):
        self.final = Path(final).absolute()
        self.overwrite = overwrite
        self._check_target()
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = self._make_temp()
        self._done = False  # committed or aborted

    def _make_temp(self) -> Path:
        """Create the hidden sibling temp dir; mode 0o777 minus umask, since it becomes the user's output."""
        # (tempfile.mkdtemp would force 0o700 onto the final directory.)
        for _ in range(100):
            p = self.final.parent / f".{self.final.name}.pymerge-tmp-{secrets.token_hex(6)}"
            try:
                os.mkdir(p, 0o777)
                return p
            except FileExistsError:
                continue
        raise MergeError(f"cannot create a temporary directory next to {self.final}")

    def _check_target(self) -> None:
        """MergeError if ``final`` holds something we must not replace."""
        f = self.final
        if self.overwrite or not (f.exists() or f.is_symlink()):
            return
        if f.is_dir() and not f.is_symlink():
            if any(f.iterdir()):
                raise MergeError(f"output directory {f} exists and is not empty (pass overwrite to replace it)")
            return
        raise MergeError(f"output path {f} exists and is not a directory (pass overwrite to replace it)")

    def commit(self) -> Path:
        """fsync everything written, then move the temp dir to ``final``; returns ``final``."""
        if self._done:
            raise MergeError(f"output directory {self.final} was already committed or aborted")
        _fsync_tree(self.path)
        self._check_target()  # it may have been filled while we were working
        f = self.final
        aside: Path | None = None
        if f.exists() or f.is_symlink():
            is_empty_dir = f.is_dir() and not f.is_symlink() and not any(f.iterdir())
            if not is_empty_dir:
                # Keep the old output until the new one is in place, so a failure here loses nothing.
                aside = f.parent / f".{f.name}.pymerge-old-{secrets.token_hex(4)}"
                os.rename(f, aside)
        try:
            os.rename(self.path, f)  # replaces an empty directory atomically on POSIX
        except OSError as e:
            if aside is not None:
                os.rename(aside, f)
            raise MergeError(f"cannot move finished output {self.path} to {f}: {e}") from e
        self._done = True
        _fsync_path(f.parent)  # make the rename itself durable
        if aside is not None:
            _remove(aside)
        return f

    def abort(self) -> None:
        """Delete the temporary directory (idempotent; does nothing after commit)."""
        if self._done:
            return
        self._done = True
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> AtomicOutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        # Commit is explicit; leaving without it (normally or by exception) throws the output away.
        self.abort()
