"""Run small tensors on one torch thread.

The torch backend's per-tensor work on small tensors is dominated by parallel-region overhead: measured on a
2-core machine under load (load average ~3-4), ties on base + 3 experts took 0.73 s per 768-element tensor with
2 threads and 0.02 s with 1; 1.55 s vs 0.40 s at 1M elements; 3.9 s vs 1.4 s at 4M. Below
``SINGLE_THREAD_ELEMENTS`` input elements a tensor therefore runs single-threaded; larger ones keep torch's setting.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

SINGLE_THREAD_ELEMENTS = 1 << 22


@contextmanager
def threads_for(elements: int) -> Iterator[None]:
    """torch.set_num_threads(1) for the duration when ``elements`` is small; restored afterwards."""
    if elements >= SINGLE_THREAD_ELEMENTS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
