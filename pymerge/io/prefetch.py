"""Populating memory-mapped input pages ahead of the kernels that read them.

A fresh mapping costs a page fault per first touch of every page (fault-around maps a few at a time); on the
2-core machines those faults took more time than the merge arithmetic of ``linear``. ``madvise(
MADV_POPULATE_READ)`` maps a whole range in one call, reading from disk what is not cached, and ``Prefetcher``
issues it for the next tensor's inputs on a background thread while the current tensor is merged (ctypes
releases the GIL for the call). Kernels that then touch the pages find them mapped. Best effort: on kernels
without MADV_POPULATE_READ (Linux < 5.14) it falls back to MADV_WILLNEED (start the disk reads only); on
other systems it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable

log = logging.getLogger("pymerge")

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux 5.14+
_PAGE = mmap.PAGESIZE


def _libc_madvise() -> Callable | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _libc_madvise()
_advice = MADV_POPULATE_READ


def populate(address: int, length: int) -> None:
    """Map (and read in) the pages of [address, address + length) of a file mapping; best effort."""
    global _advice
    if _madvise is None or length <= 0:
        return
    start = address & ~(_PAGE - 1)
    end = (address + length + _PAGE - 1) & ~(_PAGE - 1)
    if _madvise(start, end - start, _advice) != 0 and _advice == MADV_POPULATE_READ:
        _advice = MADV_WILLNEED  # EINVAL: an older kernel; the hint still starts the disk reads
        _madvise(start, end - start, _advice)


class Prefetcher:
    """One background thread that runs ``populate`` calls in submission order; ``close`` waits for it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymerge-prefetch")
        self._last: Future | None = None

    def submit(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Populate each (address, length) range, in the background."""
        ranges = list(ranges)
        if ranges and _madvise is not None:
            self._last = self._pool.submit(lambda: [populate(a, n) for a, n in ranges])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
