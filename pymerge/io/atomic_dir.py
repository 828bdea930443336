"""An output directory that appears complete or not at all: write into a hidden sibling, rename at the end.

The temporary directory lives next to the final path (same filesystem), so the final ``rename`` is atomic: a
crash or an error leaves either the old state or the finished output, never a half-written model.

``ResumableOutputDir`` is the variant a merge uses: its work lives in a sibling with a fixed name,
``.<name>.pymerge-partial/``, so a run started again after a crash finds it and continues (see io/journal.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking, one run per output directory is on the user
    fcntl = None  # type: ignore[assignment]

from pymerge.errors import MergeError
from pymerge.io.journal import JOURNAL_NAME


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


PARTIAL_SUFFIX = ".pymerge-partial"
FINGERPRINT_NAME = "fingerprint.json"
OUTPUT_SUBDIR = "output"
_FINGERPRINT_FORMAT = "pymerge-partial"
_FINGERPRINT_VERSION = 1


def partial_dir_for(final: str | Path) -> Path:
    """The fixed partial directory of output ``final``: ``.<name>.pymerge-partial`` beside it."""
    f = Path(final).absolute()
    return f.parent / f".{f.name}{PARTIAL_SUFFIX}"


def partial_bytes(final: str | Path) -> int:
    """Disk bytes already allocated to the output files of ``final``'s partial run (0 if there is none).

    A resumed run rewrites its shards in place, so these bytes need not be free a second time.
    """
    out = partial_dir_for(final) / OUTPUT_SUBDIR
    total = 0
    if out.is_dir() and not out.is_symlink():
        for dirpath, _dirs, names in os.walk(out):
            for n in names:
                try:
                    total += os.lstat(Path(dirpath) / n).st_blocks * 512
                except (OSError, AttributeError):
                    pass
    return total


class ResumableOutputDir(AtomicOutputDir):
    """An atomic output directory that survives a crash and is continued by the next run of the same merge.

    Layout of the partial directory ``root`` (``.<name>.pymerge-partial`` beside ``final``)::

        fingerprint.json   what merge this is (config, seed, inputs, layout, version); written first
        journal.jsonl      the finished tensors (io/journal.py)
        output/            ``path``: the output files; ``commit()`` renames it to ``final``

    The resume state stays outside ``output/`` so the finished output (and its manifest) never contains it.
    Opening with ``restart`` discards an existing partial run; otherwise one with the same fingerprint is
    continued (``resumed`` is True) and one with another fingerprint is refused, never reused or deleted
    silently. The partial directory is locked (flock) while open, so two runs cannot share it.
    ``keep()`` leaves it for the next run; ``abort()`` deletes it. Leaving a ``with`` block without
    ``commit()`` keeps it (the work is resumable by design).
    """

    def __init__(self, final: str | Path, *, fingerprint: dict[str, str], overwrite: bool = False,
                 restart: bool = False):
        self.final = Path(final).absolute()
        self.overwrite = overwrite
        self._check_target()
        self.root = partial_dir_for(self.final)
        self.path = self.root / OUTPUT_SUBDIR
        self.journal_path = self.root / JOURNAL_NAME
        self.resumed = False
        self._lock_fd: int | None = None
        self._done = False
        self.final.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open(dict(fingerprint), restart)
            os.makedirs(self.path, 0o777, exist_ok=True)  # 0o777 minus umask: it becomes the user's output
        except BaseException:
            self._unlock()
            raise

    # ---- opening ---------------------------------------------------------------------------------------------

    def _open(self, fingerprint: dict[str, str], restart: bool) -> None:
        root = self.root
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise MergeError(f"{root} exists and is not a pymerge partial directory; move it away to merge into "
                             f"{self.final}")
        if root.is_dir():
            self._lock(root)
            if restart:
                _remove(root)
                self._unlock()
            else:
                self._check_fingerprint(fingerprint)
                return
        try:
            os.mkdir(root, 0o700)
        except FileExistsError:
            raise MergeError(f"another pymerge run is writing {self.final} (it just created {root})") from None
        self._lock(root)
        self._write_fingerprint(fingerprint)

    def _lock(self, root: Path) -> None:
        fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise MergeError(f"another pymerge run is writing {self.final} (its partial directory {root} is "
                                 "locked); wait for it to finish or stop it") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def _check_fingerprint(self, fingerprint: dict[str, str]) -> None:
        """Continue the partial run if it is this merge; MergeError if it is another one (or unknowable)."""
        stored = _read_fingerprint(self.root / FINGERPRINT_NAME)
        hint = "pass --restart (restart=True) to discard it and start over"
        if stored is None:
            leftovers = [p.name for p in self.root.iterdir() if not p.name.startswith(FINGERPRINT_NAME)]
            if leftovers:
                raise MergeError(f"{self.root} holds a partial merge for {self.final} without a readable "
                                 f"{FINGERPRINT_NAME}, so it cannot be told apart from another merge; {hint}")
            # A crash between creating the directory and writing its fingerprint: nothing to lose, start fresh.
            self._write_fingerprint(fingerprint)
            return
        if stored != fingerprint:
            what = {"config": "config", "seed": "seed", "inputs": "input checkpoints",
                    "layout": "output layout (--out-shard-size, tensor names, shapes or dtypes)",
                    "version": "pymerge version"}
            keys = list(what) + sorted((set(stored) | set(fingerprint)) - set(what))
            diff = [what.get(k, k) for k in keys if stored.get(k) != fingerprint.get(k)]
            raise MergeError(f"{self.root} holds a partial merge for {self.final} whose {', '.join(diff)} "
                             f"differ(s) from this run's, so it is not reused; {hint}, or choose another output "
                             "directory")
        self.resumed = True

    def _write_fingerprint(self, fingerprint: dict[str, str]) -> None:
        """Write the fingerprint durably and atomically: a file that exists is complete."""
        path = self.root / FINGERPRINT_NAME
        tmp = path.with_name(FINGERPRINT_NAME + ".tmp")
        doc = {"format": _FINGERPRINT_FORMAT, "version": _FINGERPRINT_VERSION, "fingerprint": fingerprint}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(self.root)

    # ---- ending ----------------------------------------------------------------------------------------------

    def commit(self) -> Path:
        """fsync the output, rename it to ``final`` (atomically), then delete the resume state; returns ``final``."""
        f = super().commit()
        _remove(self.root)  # a crash before this leaves a stale root without output/: a later run recomputes
        self._unlock()
        return f

    def keep(self) -> None:
        """Leave the partial run for the next one to continue; release the lock (idempotent)."""
        self._done = True
        self._unlock()

    def abort(self) -> None:
        """Delete the partial run (idempotent; does nothing after commit or keep)."""
        if not self._done:
            self._done = True
            _remove(self.root)
        self._unlock()

    def __enter__(self) -> ResumableOutputDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.keep()


def _read_fingerprint(path: Path) -> dict[str, str] | None:
    """The fingerprint stored at ``path``, or None if it is missing or not one of ours."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != _FINGERPRINT_FORMAT:
        return None
    fp = doc.get("fingerprint")
    if not isinstance(fp, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in fp.items()):
        return None
    return fp
