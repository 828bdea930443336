"""The resume journal: one durable line per finished output tensor, and the check of those lines on restart.

Each line is a JSON object ``{"name", "shard", "offset", "length", "sha256"}``: where the tensor's bytes lie in
its shard file and the sha256 of those bytes (computed by the writer as it wrote them, or read back when it
could not). Ordering is what makes a line a promise: the shard's data is fsynced first, then the line is
appended and the journal fsynced, so a line on disk means its bytes were on disk before it. A crash mid-append
leaves a torn last line, which is ignored (that tensor is merged again).
On restart every line is checked anyway: the bytes are read back and hashed, and a tensor whose bytes do not
match (lost writes after a failed fsync, a flipped bit, an edited file) is merged again.

``TensorCommitter`` journals finished tensors from a background thread, so the fsyncs overlap the merging of
the next tensors instead of stalling it (the merge's floor is the disk; a synchronous fsync per tensor would
serialize compute and writeback). Its ``entries()`` (this run's lines plus the verified ones a resumed run
kept) are the per-tensor hashes the output manifest records, so no output byte is hashed twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from pymerge.errors import MergeError
from pymerge.io.safetensors_writer import ShardLayout

log = logging.getLogger("pymerge")

JOURNAL_NAME = "journal.jsonl"

# Test hook: with PYMERGE_FAULT_AFTER_TENSORS=N the process SIGKILLs itself right after the N-th tensor of this
# run is journaled (N=0: before any tensor is merged). The crash-and-resume tests use it to stop a merge at
# exact points; it is not meant for users.
FAULT_ENV = "PYMERGE_FAULT_AFTER_TENSORS"

_BLOCK = 8 * 2**20
_fdatasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


@dataclass(frozen=True)
class JournalEntry:
    """One finished tensor: its name, shard file, absolute byte offset and length there, sha256 of the bytes."""

    name: str
    shard: str
    offset: int
    length: int
    sha256: str

    def line(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n"

    @classmethod
    def parse(cls, raw: bytes) -> JournalEntry | None:
        """The entry a journal line holds, or None for a line that is garbled or incomplete."""
        try:
            obj = json.loads(raw)
            entry = cls(obj["name"], obj["shard"], obj["offset"], obj["length"], obj["sha256"])
        except (ValueError, KeyError, TypeError):
            return None
        ok = (isinstance(entry.name, str) and isinstance(entry.shard, str) and isinstance(entry.sha256, str)
              and type(entry.offset) is int and type(entry.length) is int and entry.offset >= 0 and entry.length >= 0)
        return entry if ok else None


def read_journal(path: str | Path) -> dict[str, JournalEntry]:
    """Entries of the journal at ``path`` by tensor name (a later line wins); missing file: none.

    A last line without its newline is a torn append and is ignored, as is any line that does not parse.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return {}
    lines = data.split(b"\n")
    lines.pop()  # the text after the last newline: empty, or a torn line
    entries: dict[str, JournalEntry] = {}
    skipped = 0
    for raw in lines:
        entry = JournalEntry.parse(raw)
        if entry is None:
            skipped += 1
            continue
        entries[entry.name] = entry
    if skipped:
        log.warning("journal %s: ignored %d unreadable line(s); those tensors are merged again", path, skipped)
    return entries


def tensor_extents(shards: list[ShardLayout]) -> dict[str, tuple[str, int, int]]:
    """Every output tensor's (shard filename, absolute byte offset, byte length) in the layout."""
    out = {}
    for s in shards:
        data_start = 8 + len(s.header)
        for t in s.tensors:
            out[t.name] = (s.filename, data_start + t.offset, t.nbytes)
    return out


def sha256_range(fd: int, offset: int, length: int) -> str | None:
    """Hex sha256 of ``length`` bytes at ``offset`` of ``fd``, or None if the file ends before them."""
    h = hashlib.sha256()
    buf = bytearray(min(_BLOCK, max(length, 1)))
    view = memoryview(buf)
    while length > 0:
        n = os.preadv(fd, [view[: min(length, len(buf))]], offset)
        if n <= 0:
            return None
        h.update(view[:n])  # hashlib releases the GIL on large blocks: several tensors hash in parallel
        offset += n
        length -= n
    return h.hexdigest()


class _ShardFiles:
    """Read-only descriptors of the shard files in a directory, opened on first use (fsync works on them)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._fds: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def fd(self, shard: str) -> int | None:
        with self._lock:
            if shard not in self._fds:
                try:
                    self._fds[shard] = os.open(self.directory / shard, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except FileNotFoundError:
                    self._fds[shard] = None
            return self._fds[shard]

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            if fd is not None:
                os.close(fd)


def verify_entries(directory: str | Path, shards: list[ShardLayout],
                   entries: dict[str, JournalEntry]) -> tuple[set[str], list[str]]:
    """(names whose journaled bytes are intact, names to merge again) for the entries of a partial output.

    An entry is intact when its tensor is in the layout at the journaled shard, offset and length and the
    bytes now in ``directory`` hash to the journaled sha256.
    """
    extents = tensor_extents(shards)
    files = _ShardFiles(Path(directory))

    def intact(e: JournalEntry) -> bool:
        if extents.get(e.name) != (e.shard, e.offset, e.length):
            return False
        fd = files.fd(e.shard)
        return fd is not None and sha256_range(fd, e.offset, e.length) == e.sha256

    todo = [e for e in entries.values()]
    try:
        workers = max(1, min(len(todo), os.cpu_count() or 1, 8))
        if workers == 1:
            ok = [intact(e) for e in todo]
        else:
            with ThreadPoolExecutor(workers) as pool:
                ok = list(pool.map(intact, todo))
    finally:
        files.close()
    good = {e.name for e, k in zip(todo, ok) if k}
    bad = sorted(e.name for e, k in zip(todo, ok) if not k)
    return good, bad


class Journal:
    """The journal file opened for durable appends."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            self._drop_torn_tail()
            if created:
                _fsync_dir(self.path.parent)  # the file's name must survive a crash too
        except BaseException:
            os.close(self._fd)
            raise

    def _drop_torn_tail(self) -> None:
        """Cut a torn last line (no newline) so the next append starts on a line of its own."""
        size = os.fstat(self._fd).st_size
        if size == 0 or os.pread(self._fd, 1, size - 1) == b"\n":
            return
        keep = size
        while keep > 0:
            start = max(0, keep - _BLOCK)
            at = os.pread(self._fd, keep - start, start).rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            keep = start
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)

    def append(self, entries: list[JournalEntry]) -> None:
        """Append ``entries`` and fsync; when this returns they survive a crash."""
        if not entries:
            return
        data = memoryview(b"".join(e.line() for e in entries))
        end = os.fstat(self._fd).st_size
        while data:
            n = os.pwrite(self._fd, data, end)
            data, end = data[n:], end + n
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault_after_from_env() -> int | None:
    """The test hook's tensor count from ``PYMERGE_FAULT_AFTER_TENSORS`` (None when unset)."""
    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        raise MergeError(f"{FAULT_ENV}={raw!r}: expected a whole number of tensors") from None
    if n < 0:
        raise MergeError(f"{FAULT_ENV}={raw!r}: expected a number >= 0")
    return n


def _die() -> None:
    """Stop the process the way a crash would: no cleanup, no flushing (the test hook's fault)."""
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


class TensorCommitter:
    """Journals finished tensors in the background: shard fsync, sha256, journal append + fsync.

    ``tensor_done(name)`` is called once a tensor's last byte has been written to its shard in ``directory``;
    ``close()`` waits until every such tensor is journaled and raises the first error the thread met (an
    OSError of a full or failing disk, typically). ``journaled`` counts the tensors journaled so far.
    ``resumed`` are the entries of an interrupted run whose bytes were verified (``verify_entries``); they are
    not journaled again but are part of ``entries()``. ``digests(name)``, when given, is the hex sha256 of a
    finished tensor's bytes as written (``ShardedWriter.digest``), or None, and then the bytes are read back
    and hashed: reading back 2 GB of output and hashing it cost ~2.3 s of the 2 cores on a 1B merge, while the
    writer hashes the same bytes from memory as it writes them.
    """

    def __init__(self, directory: str | Path, shards: list[ShardLayout], journal: Journal, *,
                 fault_after: int | None = None, resumed: dict[str, JournalEntry] | None = None,
                 digests: Callable[[str], str | None] | None = None):
        self.journal = journal
        self._digests = digests
        self.journaled = 0
        self._extents = tensor_extents(shards)
        self._entries: dict[str, JournalEntry] = dict(resumed or {})  # written by the thread, read after close
        self._files = _ShardFiles(Path(directory))
        self._fault_after = fault_after
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        self._dir_synced = False
        if fault_after == 0:
            _die()
        # A daemon thread: a second Ctrl-C must be able to end the process even while an fsync is slow.
        self._thread = threading.Thread(target=self._run, name="pymerge-journal", daemon=True)
        self._thread.start()

    def tensor_done(self, name: str) -> None:
        """Queue ``name`` (fully written) for journaling; raises an error the thread met earlier."""
        if self._error is not None:
            raise self._error
        if name not in self._extents:
            raise MergeError(f"output tensor {name!r} is not in the output layout")
        self._queue.put(name)

    def close(self, *, raise_errors: bool = True) -> None:
        """Journal everything queued, stop the thread, close the files; re-raise its error if asked."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        self._files.close()
        self.journal.close()
        if raise_errors and self._error is not None:
            raise self._error

    def entries(self) -> dict[str, JournalEntry]:
        """Every tensor of the whole run with its journaled extent and sha256, by name: the resumed ones and
        those journaled by this run. Call it after ``close()`` (the thread adds to it until then)."""
        if not self._closed or self._thread.is_alive():
            raise MergeError("TensorCommitter.entries() called before close()")
        return dict(self._entries)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:  # take everything already queued: one fsync per shard covers the whole batch
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            names = [n for n in batch if n is not None]
            if names and self._error is None:
                try:
                    self._commit(names)
                except BaseException as e:  # reported to the main thread by tensor_done/close
                    self._error = e
            if None in batch:
                return

    def _commit(self, names: list[str]) -> None:
        if self._fault_after is not None:
            names = names[: max(self._fault_after - self.journaled, 0)]
        if not self._dir_synced:
            _fsync_dir(self._files.directory)  # the shard files' names, once: they exist from the start
            self._dir_synced = True
        shards = sorted({self._extents[n][0] for n in names})
        for shard in shards:
            fd = self._files.fd(shard)
            if fd is None:
                raise FileNotFoundError(f"shard {shard} vanished from {self._files.directory}")
            _fdatasync(fd)  # the data first: a journal line must never promise bytes that are not on disk
        entries = []
        for n in names:
            shard, offset, length = self._extents[n]
            digest = self._digests(n) if self._digests is not None else None
            if digest is None:
                digest = sha256_range(self._files.fd(shard), offset, length)  # type: ignore[arg-type]
            if digest is None:
                raise MergeError(f"output tensor {n!r}: shard {shard} is shorter than its layout")
            entries.append(JournalEntry(n, shard, offset, length, digest))
        self.journal.append(entries)
        self._entries.update((e.name, e) for e in entries)  # only once durable: what the journal promises
        self.journaled += len(entries)
        if self._fault_after is not None and self.journaled >= self._fault_after:
            _die()
