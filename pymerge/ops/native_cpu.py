"""Torch-facing wrappers of the C++ CPU kernels in ``pymerge._C`` (CPU tensors only).

Each wrapper checks what the kernel cannot see (device, contiguity, shapes, dtypes), allocates the
output and passes ``data_ptr()``s, element counts and dtype codes to ``pymerge._C``. Bad arguments
raise ValueError/TypeError (programming errors); a missing extension raises
``pymerge.errors.BackendUnavailable``. The argument checks here are shared with ``native_cuda``.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from pymerge._native import require_cpu

# The kernels' storage formats and their codes in pymerge._C (DTYPE_F32/F16/BF16; stable numbers).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)


def dtype_code(dtype: torch.dtype, what: str) -> int:
    """The pymerge._C code of ``dtype``; raises TypeError naming ``what`` when no kernel handles it."""
    try:
        return DTYPE_CODES[dtype]
    except (KeyError, TypeError):
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(
            f"{what}: dtype {dtype} is not supported by the native kernels (expected one of {names})"
        ) from None


def check_tensor(x: object, what: str, device_type: str) -> torch.Tensor:
    """``x`` itself, after checking it is a contiguous tensor on a ``device_type`` device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.device.type != device_type:
        raise ValueError(f"{what}: expected a {device_type} tensor, got one on {x.device}")
    if not x.is_contiguous():
        raise ValueError(
            f"{what}: expected a contiguous tensor (call .contiguous() first), got strides {x.stride()}"
        )
    return x


def check_inputs(xs: Sequence[torch.Tensor], weights: Sequence[float], device_type: str) -> list[float]:
    """The weights as Python floats, after checking ``xs`` share shape, dtype, device and fit ``weights``."""
    if isinstance(xs, torch.Tensor) or len(xs) == 0:
        raise ValueError("xs: expected a non-empty list of tensors")
    if len(weights) != len(xs):
        raise ValueError(f"weights: got {len(weights)} weights for {len(xs)} tensors (one weight per tensor)")
    first = check_tensor(xs[0], "xs[0]", device_type)
    for j, x in enumerate(xs[1:], start=1):
        check_tensor(x, f"xs[{j}]", device_type)
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"xs[{j}]: {tuple(x.shape)} {x.dtype} on {x.device} differs from xs[0]: "
                f"{tuple(first.shape)} {first.dtype} on {first.device}"
            )
    return [float(w) for w in weights]


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[i] = dtype(x[i]): float32/float16/bfloat16 both ways, round to nearest even.

    Bit-exact with ``x.to(dtype)`` for every non-NaN value (NaN stays NaN, sign kept, quiet bit set on
    narrowing). ``x`` must be a contiguous CPU tensor. Returns a new tensor of x's shape.
    """
    native = require_cpu("the native CPU cast")
    check_tensor(x, "x", "cpu")
    src_code = dtype_code(x.dtype, "x")
    dst_code = dtype_code(dtype, "dtype")
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    native.cast(x.data_ptr(), src_code, out.data_ptr(), dst_code, x.numel())
    return out


def weighted_sum(
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """out = out_dtype(sum_j w_j * float32(xs[j]) [/ sum_j w_j]), elementwise.

    fp32 math: acc = w_0*x_0, then acc = acc + w_j*x_j for j = 1.. in the given order, every mul and add
    rounded to fp32 (no FMA); weights are rounded to fp32; the normalizing divisor is the sum of the
    weights in float64, rounded to fp32, and the division is IEEE. Output cast with round to nearest
    even. Bit-identical to ``native_cuda.weighted_sum``. ``xs`` are contiguous CPU tensors of one shape
    and dtype; ``out_dtype`` defaults to theirs. Weights must be finite; normalize needs a non-zero sum.
    """
    native = require_cpu("the native CPU weighted_sum")
    ws = check_inputs(xs, weights, "cpu")
    in_code = dtype_code(xs[0].dtype, "xs")
    out_dtype = xs[0].dtype if out_dtype is None else out_dtype
    out_code = dtype_code(out_dtype, "out_dtype")
    out = torch.empty(xs[0].shape, dtype=out_dtype, device=xs[0].device)
    native.weighted_sum(
        [x.data_ptr() for x in xs], in_code, ws, out.data_ptr(), out_code, out.numel(), bool(normalize)
    )
    return out


def count_nonfinite(xs: Sequence[torch.Tensor]) -> list[int]:
    """[#{i : xs[j][i] is Inf or NaN} for each j]: the stored elements' exponent bits, no widening.

    ``xs`` are contiguous CPU tensors of one shape and dtype (float32, float16 or bfloat16).
    """
    native = require_cpu("the native CPU non-finite count")
    first = _check_same(xs, "xs")
    return list(native.count_nonfinite([x.data_ptr() for x in xs], dtype_code(first.dtype, "xs"), first.numel()))


# ---- Philox random stream (pymerge/ops/philox.py is the twin and states the contract) ----

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def philox4x32_10(counter: Sequence[int], key: Sequence[int]) -> tuple[int, int, int, int]:
    """The four output words of Philox4x32-10 for a 4-word counter and a 2-word key (each word < 2**32)."""
    native = require_cpu("the native Philox generator")
    return tuple(native.philox4x32_10([int(c) for c in counter], [int(k) for k in key]))  # type: ignore[return-value]


def philox_uniform24(seed: int, model: int, tensor_name: str, start: int, count: int) -> torch.Tensor:
    """u24[i] = word(seed, model, tensor_name, start + i) >> 8: the 24-bit uniforms of flat elements
    [start, start + count) as an int32 tensor (uniform = u24 * 2**-24).

    Bit-identical to ``pymerge.ops.philox.random_words(...) >> 8`` (same key, counter and element layout).
    """
    from .philox import name_hash

    native = require_cpu("the native Philox generator")
    out = torch.empty(int(count), dtype=torch.int32)
    native.philox_uniform24(int(seed) & _MASK64, int(model) & _MASK32, name_hash(tensor_name), int(start),
                            int(count), out.data_ptr())
    return out


def philox_keep_mask(seed: int, model: int, tensor_name: str, start: int, count: int, prob: float) -> torch.Tensor:
    """keep[i] = float32(u24[i]) < float32(prob) * 2**24 (Bernoulli(prob)) for flat elements [start, start+count).

    Bit-identical to ``pymerge.ops.philox.keep_mask`` with a scalar ``prob`` (per-element probabilities are not
    implemented natively yet). Returns a bool tensor of ``count`` elements.
    """
    from .philox import name_hash

    if isinstance(prob, torch.Tensor):
        raise TypeError("prob: the native keep-mask takes one float probability, got a tensor")
    native = require_cpu("the native Philox generator")
    out = torch.empty(int(count), dtype=torch.bool)  # one byte per element, 0 or 1: what the kernel writes
    native.philox_keep_mask(int(seed) & _MASK64, int(model) & _MASK32, name_hash(tensor_name), int(start),
                            int(count), float(prob), out.data_ptr())
    return out


# ---- Radix histograms of magnitude keys (pymerge/ops/select.py is the twin) ----

RADIX_BINS = 1 << 16
NONFINITE_HI_BIN = 0x7F80  # hi bin of the fp32 key 0x7F800000 (+Inf); NaN keys sort above it


def _check_same(xs: Sequence[torch.Tensor], what: str, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference tensor (``like`` or ``xs[0]``), after checking every tensor matches its shape and dtype."""
    if isinstance(xs, torch.Tensor) or len(xs) == 0:
        raise ValueError(f"{what}: expected a non-empty list of tensors")
    first = check_tensor(xs[0] if like is None else like, f"{what}[0]" if like is None else "base", "cpu")
    dtype_code(first.dtype, what)
    for j, x in enumerate(xs):
        check_tensor(x, f"{what}[{j}]", "cpu")
        if x.shape != first.shape or x.dtype != first.dtype:
            ref = f"{what}[0]" if like is None else "base"
            raise ValueError(f"{what}[{j}]: {tuple(x.shape)} {x.dtype} differs from {ref}: "
                             f"{tuple(first.shape)} {first.dtype}")
    return first


def _hist_buffer(hist: Optional[torch.Tensor], rows: int) -> torch.Tensor:
    if hist is None:
        return torch.zeros(rows, RADIX_BINS, dtype=torch.int64)
    check_tensor(hist, "hist", "cpu")
    if hist.dtype != torch.int64 or tuple(hist.shape) != (rows, RADIX_BINS):
        raise ValueError(f"hist: expected an int64 tensor of shape ({rows}, {RADIX_BINS}), "
                         f"got {hist.dtype} {tuple(hist.shape)}")
    return hist


def radix_hist_hi(xs: Sequence[torch.Tensor], *, base: Optional[torch.Tensor] = None,
                  hist: Optional[torch.Tensor] = None, sample_shift: int = 0) -> torch.Tensor:
    """hist[j, b] += #{i : key_j[i] >> 16 == b}, key_j = fp32 bits of |xs[j] - base| (or |xs[j]| without base).

    The difference is taken in fp32 after widening. Equals ``torch.bincount(magnitude_keys(x) >> 16)`` row by
    row. ``hist`` (int64, [len(xs), 65536]) is accumulated into when given, else a zeroed one is returned.
    For bfloat16 without a base every key's low 16 bits are 0 (the hi histogram alone decides the threshold).
    ``sample_shift`` s > 0 counts a sample only: the elements i with i % 4096 < 4096 >> s.
    """
    native = require_cpu("the native radix histogram")
    first = _check_same(xs, "xs", base)
    out = _hist_buffer(hist, len(xs))
    native.radix_hist_hi([x.data_ptr() for x in xs], dtype_code(first.dtype, "xs"), first.numel(),
                         out.data_ptr(), 0 if base is None else base.data_ptr(), int(sample_shift))
    return out


def bracket_blocks(n: int) -> int:
    """How many (start, count) spans ``radix_bracket`` reports for n elements: one per kernel block."""
    return -(-int(n) // require_cpu("the native radix bracket pass").PARALLEL_BLOCK)


def radix_bracket(xs: Sequence[torch.Tensor], lo_keys: Sequence[int], hi_keys: Sequence[int],
                  outs: Sequence[torch.Tensor], filled: Sequence[int], *, base: Optional[torch.Tensor] = None,
                  spans: Optional[torch.Tensor] = None) -> tuple[list[int], list[int], list[int]]:
    """(filled, above, nonfinite): for each xs[j] (keys as in ``radix_hist_hi``; several entries may be the same
    tensor), ``above[j]`` = #(key >= hi_keys[j]), ``nonfinite[j]`` = #(key >= 0x7F800000), and the keys in
    [lo_keys[j], hi_keys[j]) appended to the int32 buffer ``outs[j]`` from ``filled[j]`` on. The returned
    filled[j] counts every such key; > outs[j].numel() means the buffer overflowed (the keys past its end were
    dropped). Each block of ``PARALLEL_BLOCK`` elements stores its keys contiguously in flat order, the blocks
    in no particular order; ``spans`` (int64 [len(xs), bracket_blocks(n), 2]), when given, receives each
    block's (start in outs[j], count)."""
    native = require_cpu("the native radix bracket pass")
    first = _check_same(xs, "xs", base)
    for j, o in enumerate(outs):
        check_tensor(o, f"outs[{j}]", "cpu")
        if o.dtype != torch.int32 or o.dim() != 1:
            raise ValueError(f"outs[{j}]: expected a 1-D int32 tensor, got {o.dtype} {tuple(o.shape)}")
    span_ptrs = []
    if spans is not None:
        check_tensor(spans, "spans", "cpu")
        want = (len(xs), bracket_blocks(first.numel()), 2)
        if spans.dtype != torch.int64 or tuple(spans.shape) != want or not spans.is_contiguous():
            raise ValueError(f"spans: expected a contiguous int64 tensor of shape {want}, got {spans.dtype} "
                             f"{tuple(spans.shape)}")
        span_ptrs = [spans[j].data_ptr() for j in range(len(xs))]
    f, above, nonfinite = native.radix_bracket(
        [x.data_ptr() for x in xs], dtype_code(first.dtype, "xs"), first.numel(), [int(v) for v in lo_keys],
        [int(v) for v in hi_keys], [o.data_ptr() for o in outs], [o.numel() for o in outs], [int(v) for v in filled],
        0 if base is None else base.data_ptr(), span_ptrs)
    return list(f), list(above), list(nonfinite)


def radix_hist_lo(xs: Sequence[torch.Tensor], hi_bins: Sequence[int], *, base: Optional[torch.Tensor] = None,
                  hist: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hist[j, key & 0xFFFF] += 1 for the keys of xs[j] (as in ``radix_hist_hi``) with key >> 16 == hi_bins[j]."""
    native = require_cpu("the native radix histogram")
    first = _check_same(xs, "xs", base)
    if len(hi_bins) != len(xs):
        raise ValueError(f"hi_bins: got {len(hi_bins)} bins for {len(xs)} tensors (one per tensor)")
    out = _hist_buffer(hist, len(xs))
    native.radix_hist_lo([x.data_ptr() for x in xs], dtype_code(first.dtype, "xs"), first.numel(),
                         [int(b) for b in hi_bins], out.data_ptr(), 0 if base is None else base.data_ptr())
    return out


# ---- TIES (pymerge/methods/task_arithmetic.py with the magnitude sparsifier is the twin) ----

def topk_count(density: float, n: int) -> int:
    """Elements the magnitude trim keeps of n at ``density`` (the Sparsifier's rule): all when d >= 1, none when
    d <= 0, else max(1, int(d * n))."""
    if density >= 1:
        return n
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


def tie_budget(th) -> int:
    """The ``ties_map`` tie budget of a ``pymerge.ops.select.Threshold``: -1 keeps every tie, else how many."""
    return -1 if th.keep_all_ties else int(th.ties)


class _HistPool:
    """Reused zeroed int64 [rows, 65536] histograms. A fresh 1.5 MB allocation per tensor page-faulted on every
    use: allocating and zeroing them took ~10% of a native TIES merge of the demo preset."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, rows: int) -> torch.Tensor:
        with self._lock:
            for i, h in enumerate(self._free):
                if h.shape[0] >= rows:
                    hist = self._free.pop(i)[:rows]
                    hist.numpy().fill(0)  # numpy: one thread, no wake-up of torch's OpenMP pool
                    return hist
        return torch.zeros(rows, RADIX_BINS, dtype=torch.int64)

    def give(self, hist: torch.Tensor) -> None:
        base = hist if hist._base is None else hist._base
        with self._lock:
            if len(self._free) < 4:  # a few sizes (expert counts) are all a merge uses
                self._free.append(base)


_HIST_POOL = _HistPool()


# Sampled selection (MagnitudeTopK): tensors of at least SAMPLE_MIN elements take their first histogram from a
# sample of 1 / 2^shift of the elements (a run at the start of every 4096), with shift chosen so the sample keeps
# >= ~2^SAMPLE_LOG2 elements.
SAMPLE_MIN = 1 << 21
SAMPLE_LOG2 = 20
MAX_SAMPLE_SHIFT = 4
# The bracket spans the sample ranks k' +- (BRACKET_SIGMAS * sd + BRACKET_SLACK), sd the binomial deviation of the
# k-th key's rank in the sample, widened to whole hi bins; generous, because the sample is runs of 256+
# elements rather than independent draws. The keys inside are copied out (int32): Gaussian-like task vectors
# put 0.6-1% of their keys in brackets of 3-9 hi bins at density 0.2-0.9 (measured on base + 3 x 16.8M bf16,
# 1/16 sample). The buffer is sized
# from the sample with CANDIDATE_HEADROOM, at most CANDIDATE_CAP keys (16 MB per selection: with the hi
# histograms, the selection's only memory beyond the executor's budget, and fixed, whatever the model size); a
# bracket expected to hold more (e.g. a 128K x 4096 embedding), or one whose buffer overflows, takes the plain
# two histogram passes instead.
BRACKET_SIGMAS = 6.0
BRACKET_SLACK = 32
CANDIDATE_HEADROOM = 1.25
CANDIDATE_CAP = 1 << 22


def sample_shift(n: int) -> int:
    """Sampling shift of the first pass for a selection over n elements (0: every element)."""
    if n < SAMPLE_MIN:
        return 0
    return max(0, min(MAX_SAMPLE_SHIFT, (n.bit_length() - 1) - SAMPLE_LOG2))


class MagnitudeTopK:
    """Exact top-k thresholds of several task vectors x_j - base, accumulated chunk by chunk with native passes:
    ``add(p, base, experts)`` over every chunk, then ``end(p)``, for p in range(``passes``); ``result`` after.

    The native twin of ``pymerge.ops.select.TopKSelector``: the same keys, thresholds and tie counts, by a
    different route. Pass 0 histograms the hi 16 bits of a sample (``sample_shift``; every key for small
    tensors), which brackets the k-th largest key within a few hi bins. Pass 1, the only full-resolution pass,
    counts the keys above the bracket and copies out the keys inside it (``radix_bracket``); the exact threshold
    is then the right order statistic of those, whenever the k-th key fell inside. When it did not (an
    unrepresentative sample), or the bracket would hold too many keys, passes 2 and 3 run the plain hi and lo
    histograms for that selection; otherwise they read nothing. Without sampling pass 0 is the plain hi
    histogram, so the bracket is the k-th key's bin: never a miss. ``missed`` lists the selections that needed
    passes 2-3 (for tests).

    A threshold is marked ``keep_all_ties`` when the kept ties are all the elements equal to its key, so the
    map pass needs no flat-order tie cutoff for it. ``passes`` is 0 when every k is trivial (0 or n).
    ``nonfinite`` is complete after pass 2: > 0 when a task-vector key of an expert selected for is Inf/NaN.
    """

    def __init__(self, ks: Sequence[int], n: int, src: Optional[Sequence[int]] = None,
                 shift: Optional[int] = None):
        from .select import Threshold

        self.ks, self.n = [int(k) for k in ks], int(n)
        # selection j reads expert src[j] (breadcrumbs: two selections per expert share its hi histogram)
        self.src = list(range(len(self.ks))) if src is None else [int(e) for e in src]
        self.result: list = [Threshold(key=2**31 - 1, ties=0) if k <= 0 else Threshold(key=-1, ties=0)
                             for k in self.ks]
        self.todo = [j for j, k in enumerate(self.ks) if 0 < k < n]
        self.hi_experts = sorted({self.src[j] for j in self.todo})  # one hi histogram row per expert read
        self.passes = 4 if self.todo else 0
        self.shift = sample_shift(self.n) if shift is None else int(shift)
        self.hist = _HIST_POOL.take(len(self.todo)) if self.todo else None  # rows: one per expert or selection
        self.brackets: dict[int, tuple[int, int]] = {}  # selection -> [lo key, hi key)
        self.candidates: dict[int, torch.Tensor] = {}
        self.filled: dict[int, int] = {}
        self.above: dict[int, int] = {}
        self.missed: list[int] = []  # selections resolved by passes 2-3
        self.hi: dict[int, tuple[int, int]] = {}  # pass 2: selection -> (hi bin, count above it)
        self.nonfinite = 0
        # pass 1: (flat offset of the chunk, its blocks' (start, count) spans per bracketed selection)
        self._spans: list[tuple[int, torch.Tensor]] = []
        self._offset = 0
        # selection -> (flat index of the block where its kept ties run out, how many of that block's ties are
        # kept): found from pass 1's stored keys, so the map's tie scan reads one block instead of the tensor
        self._tie_blocks: dict[int, tuple[int, int]] = {}

    # -- pass 0: hi histogram of the sample ------------------------------------------------------------------
    def _end_sample(self) -> None:
        from .select import TopWalk

        row = {e: r for r, e in enumerate(self.hi_experts)}
        for j in self.todo:
            walk = TopWalk(self.hist[row[self.src[j]]].numpy())
            k = self.ks[j]
            if self.shift == 0:  # the histogram of every key: the bracket is the k-th key's bin
                hi_bin = lo_bin = walk.bin(k)[0]
                expected = walk.count(hi_bin)
            else:
                sampled = walk.total
                p = k / self.n
                expect = p * sampled
                margin = BRACKET_SIGMAS * math.sqrt(sampled * p * (1.0 - p)) + BRACKET_SLACK
                top, bottom = math.floor(expect - margin), math.ceil(expect + margin)
                if top < 1 or bottom > sampled:  # the bracket would reach past the sample's extremes
                    self.missed.append(j)
                    continue
                (hi_bin, above_hi), (lo_bin, above_lo) = walk.bin(top), walk.bin(bottom)
                in_sample = above_lo + walk.count(lo_bin) - above_hi  # sampled keys in bins lo_bin..hi_bin
                expected = math.ceil(in_sample * (self.n / max(sampled, 1)) * CANDIDATE_HEADROOM) + 4096
            if expected > CANDIDATE_CAP:
                self.missed.append(j)
                continue
            self.brackets[j] = (lo_bin << 16, (hi_bin + 1) << 16)
            self.candidates[j] = torch.empty(min(expected, CANDIDATE_CAP), dtype=torch.int32)
            self.filled[j] = 0
            self.above[j] = 0

    # -- pass 1: counts above, and the keys inside, each bracket ----------------------------------------------
    def _add_bracket(self, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
        sels = list(self.brackets)
        spans = torch.empty((len(sels), bracket_blocks(base.numel()), 2), dtype=torch.int64)
        filled, above, nonfinite = radix_bracket(
            [experts[self.src[j]] for j in sels], [self.brackets[j][0] for j in sels],
            [self.brackets[j][1] for j in sels], [self.candidates[j] for j in sels], [self.filled[j] for j in sels],
            base=base, spans=spans)
        self._spans.append((self._offset, spans))
        self._offset += base.numel()
        for j, f, a in zip(sels, filled, above):
            self.filled[j] = f
            self.above[j] += a
        # every expert selected for is read whole by this pass unless all its selections missed in pass 0
        self.nonfinite += sum(nonfinite)

    def _end_bracket(self) -> None:
        from .select import Threshold

        for row, j in enumerate(self.brackets):  # row: j's row in pass 1's span tables
            count, buf = self.filled[j], self.candidates[j]
            need = self.ks[j] - self.above[j]
            if count > buf.numel() or need < 1 or need > count:  # overflowed, or the k-th key is outside
                self.missed.append(j)
                continue
            keys = buf[:count]
            key = int(torch.kthvalue(keys, count - need + 1).values)  # the need-th largest
            keys_np = keys.numpy()
            ties = need - int(np.count_nonzero(keys_np > key))
            equal = keys_np == key
            all_ties = ties == int(np.count_nonzero(equal))
            self.result[j] = Threshold(key=key, ties=ties, keep_all_ties=all_ties)
            if not all_ties:
                self._tie_blocks[j] = self._tie_block(row, equal, ties)
        self.candidates = {}
        self._spans = []
        self.missed.sort()
        if self.missed:
            self.hist.numpy().fill(0)  # passes 2-3 histogram again

    def _tie_block(self, row: int, equal: np.ndarray, ties: int) -> tuple[int, int]:
        """(flat index of the block holding the ``ties``-th key equal to the threshold in flat order, how many
        of the block's equal keys are kept), from the equal flags of the stored keys and pass 1's spans (row
        ``row`` of each chunk's span table): every tie lies in the bracket, so the stored keys hold them all."""
        at_equal = np.concatenate(([0], np.cumsum(equal, dtype=np.int64)))
        seen = 0
        block = require_cpu("the native radix bracket pass").PARALLEL_BLOCK
        for offset, spans in self._spans:
            sp = spans[row].numpy()
            per_block = at_equal[sp[:, 0] + sp[:, 1]] - at_equal[sp[:, 0]]
            cum = np.cumsum(per_block)
            if seen + int(cum[-1]) >= ties:
                b = int(np.searchsorted(cum, ties - seen))  # first block whose running count reaches it
                before = seen + (int(cum[b - 1]) if b else 0)
                return offset + b * block, ties - before
            seen += int(cum[-1])
        raise AssertionError("the stored keys hold fewer ties than the threshold keeps")

    # -- passes 2-3: the plain hi and lo histograms, for the selections the bracket missed ---------------------
    def _missed_experts(self) -> list[int]:
        return sorted({self.src[j] for j in self.missed})

    def _add_hi(self, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
        rows = self._missed_experts()
        radix_hist_hi([experts[e] for e in rows], base=base, hist=self.hist[:len(rows)])

    def _end_hi(self) -> None:
        from .select import TopWalk

        rows = self._missed_experts()
        row = {e: r for r, e in enumerate(rows)}
        self.hi = {j: TopWalk(self.hist[row[self.src[j]]].numpy()).bin(self.ks[j]) for j in self.missed}
        # keys >= 0x7F800000 are |x - base| = Inf or NaN (experts the bracket pass did not read are among these)
        self.nonfinite += int(self.hist[:len(rows), NONFINITE_HI_BIN:].numpy().sum())
        self.hist.numpy().fill(0)

    def _add_lo(self, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
        radix_hist_lo([experts[self.src[j]] for j in self.missed], [self.hi[j][0] for j in self.missed], base=base,
                      hist=self.hist[:len(self.missed)])

    def _end_lo(self) -> None:
        from .select import Threshold, TopWalk

        for r, j in enumerate(self.missed):
            need = self.ks[j] - self.hi[j][1]
            lo, above_lo = TopWalk(self.hist[r].numpy()).bin(need)
            ties = need - above_lo
            self.result[j] = Threshold(key=(self.hi[j][0] << 16) | lo, ties=ties,
                                       keep_all_ties=ties == int(self.hist[r, lo]))

    def add(self, p: int, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> None:
        if p == 0:
            radix_hist_hi([experts[e] for e in self.hi_experts], base=base, hist=self.hist[:len(self.hi_experts)],
                          sample_shift=self.shift)
        elif p == 1:
            if self.brackets:
                self._add_bracket(base, experts)
        elif self.missed:
            (self._add_hi if p == 2 else self._add_lo)(base, experts)

    def end(self, p: int) -> None:
        if p == 0:
            self._end_sample()
        elif p == 1:
            self._end_bracket()
        elif self.missed:
            (self._end_hi if p == 2 else self._end_lo)()
        if p == self.passes - 1 and self.hist is not None:
            _HIST_POOL.give(self.hist)
            self.hist = None

    def tie_scan(self) -> "TieScan":
        """The map pass's tie cutoffs for ``result`` (call after the last pass)."""
        starts, budgets = [], []
        for j, th in enumerate(self.result):
            start, budget = self._tie_blocks.get(j, (0, tie_budget(th)))
            starts.append(start)
            budgets.append(budget)
        return TieScan([th.key for th in self.result], budgets, starts)

    def run(self, base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list:
        """Every pass over one in-memory chunk; the thresholds."""
        for p in range(self.passes):
            self.add(p, base, experts)
            self.end(p)
        return self.result


class TieScan:
    """Flat-order tie cutoffs for the map pass, chunk by chunk: selection j keeps every key equal to keys[j] at a
    flat index below starts[j], then the first budgets[j] of those from starts[j] on (-1: every one).

    ``cutoffs(base, xs, offset)`` gives, for the chunk of ``base.numel()`` elements starting at flat index
    ``offset``, the per-selection cutoff that ``ties_map`` applies (keep ties at chunk index <= cutoff). Chunks
    come in flat order. A selection whose cutoff is not found yet scans (``tie_cutoffs``) only from its start,
    so a start from ``MagnitudeTopK`` (the block holding the last kept tie) scans at most one block.
    """

    def __init__(self, keys: Sequence[int], budgets: Sequence[int], starts: Sequence[int]):
        self.keys = [int(k) for k in keys]
        self.budgets = [int(b) for b in budgets]
        self.starts = [int(s) for s in starts]
        # flat index of the last kept tie once known (start - 1 when the budget is 0)
        self.found: list[Optional[int]] = [s - 1 if b == 0 else None for s, b in zip(self.starts, self.budgets)]

    def cutoffs(self, base: torch.Tensor, xs: Sequence[torch.Tensor], offset: int) -> list[int]:
        n = base.numel()
        out = []
        for j, x in enumerate(xs):
            if self.budgets[j] < 0:
                out.append(n)  # every tie is kept
                continue
            if self.found[j] is None and self.starts[j] < offset + n:
                a = max(self.starts[j] - offset, 0)
                (cut,), (left,) = tie_cutoffs(base.reshape(-1)[a:], [x.reshape(-1)[a:]], [self.keys[j]],
                                              [self.budgets[j]])
                if left == 0:
                    self.found[j] = offset + a + cut
                else:  # fewer ties in the rest of this chunk than the budget: the next chunk goes on
                    self.budgets[j], self.starts[j] = left, offset + n
            last = self.found[j]
            if last is None:
                out.append(n)  # the last kept tie is in a later chunk
            else:
                out.append(min(max(last - offset, -1), n))
        return out


def ties_thresholds(base: torch.Tensor, experts: Sequence[torch.Tensor], densities: Sequence[float]) -> list:
    """Exact magnitude thresholds of each task vector experts[j] - base (fp32) for its top-``density`` trim.

    ``MagnitudeTopK`` on a single chunk: a (sampled) hi histogram, then one bracket pass, over every expert
    that needs one. Returns one ``pymerge.ops.select.Threshold`` per expert, the same
    key and ties as ``TopKSelector``, marked ``keep_all_ties`` when the kept ties are all the elements equal to
    the key.
    """
    _check_same(experts, "experts", base)
    if len(densities) != len(experts):
        raise ValueError(f"densities: got {len(densities)} densities for {len(experts)} experts")
    for j, d in enumerate(densities):
        if not d >= 0:
            raise ValueError(f"densities[{j}]: must be >= 0, got {d}")
    return MagnitudeTopK([topk_count(float(d), base.numel()) for d in densities], base.numel()).run(base, experts)


def tie_cutoffs(base: torch.Tensor, experts: Sequence[torch.Tensor], thresh_keys: Sequence[int],
                tie_budgets: Sequence[int]) -> tuple[list[int], list[int]]:
    """(cutoffs, budgets left): per expert, the flat index of the tie_budgets[j]-th element (flat order) whose
    key |experts[j] - base| (fp32 bits) equals thresh_keys[j], so that "keep the first budget ties" becomes
    "keep the ties at index <= cutoff".

    A budget of -1 (keep every tie) gives cutoff n and stays -1; 0 gives -1. When the tensor holds fewer ties
    than the budget, the cutoff is n and the budget left is what a following chunk may still keep; otherwise
    the budget left is 0. The scan stops at the last cutoff found.
    """
    native = require_cpu("the native CPU TIES tie cutoffs")
    _check_same(experts, "experts", base)
    k = len(experts)
    for what, values in (("thresh_keys", thresh_keys), ("tie_budgets", tie_budgets)):
        if len(values) != k:
            raise ValueError(f"{what}: got {len(values)} values for {k} experts (one per expert)")
    cutoffs, left = native.tie_cutoffs(base.data_ptr(), [x.data_ptr() for x in experts],
                                       dtype_code(base.dtype, "base"), base.numel(), [int(t) for t in thresh_keys],
                                       [int(b) for b in tie_budgets])
    return list(cutoffs), list(left)


def ties_map(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float],
             thresh_keys: Sequence[int], tie_cutoffs: Sequence[int], *, lambda_: float = 1.0,
             normalize: bool = True, consensus: bool = True, out_dtype: Optional[torch.dtype] = None,
             out: Optional[torch.Tensor] = None, inner_keys: Optional[Sequence[int]] = None,
             inner_cutoffs: Optional[Sequence[int]] = None) -> torch.Tensor:
    """out = out_dtype(base + lambda * [normalized] disjoint mean of the sign-agreeing trimmed, weighted task
    vectors), in one fused pass.

    Per element i, in fp32 with each operation rounded: t_j = x_j - base; keep_j = key(t_j) > T_j, or
    key(t_j) == T_j and i <= tie_cutoffs[j]; d_j = t_j * keep_j * w_j; gamma = +1 if d_0 + d_1 + ... >= 0
    else -1; a_j = sgn(d_j) == gamma; mixed = sum_j d_j a_j, divisor = sum_j w_j a_j (0 -> 1), both in expert
    order; r = mixed / divisor if normalize; r *= lambda; out = base + r, cast with round to nearest even.
    Bit-identical to the torch TIES of ``pymerge.ops.merge_tensors("ties", ...)`` given that method's
    thresholds (``tie_cutoffs`` turns its tie counts into cutoffs). ``out_dtype`` defaults to base's dtype.
    With ``consensus=False`` there is no election: mixed = sum_j d_j and divisor = sum_j w_j (|.| < 1e-8 -> 1),
    the generalized task arithmetic of ``task_arithmetic`` (no trim) and of a magnitude-trimmed sum.
    ``out``, when given, is written into (contiguous, base's shape, ``out_dtype``). ``inner_keys`` and
    ``inner_cutoffs`` (breadcrumbs) also drop what a second threshold keeps: keep_j = kept by (T_j, cutoff_j)
    and not kept by (inner_keys[j], inner_cutoffs[j]), the top k_outer minus the top k_inner.
    """
    native = require_cpu("the native CPU TIES map")
    _check_same(experts, "experts", base)
    k = len(experts)
    for what, values in (("weights", weights), ("thresh_keys", thresh_keys), ("tie_cutoffs", tie_cutoffs)):
        if len(values) != k:
            raise ValueError(f"{what}: got {len(values)} values for {k} experts (one per expert)")
    in_code = dtype_code(base.dtype, "base")
    out_dtype = base.dtype if out_dtype is None else out_dtype
    out_code = dtype_code(out_dtype, "out_dtype")
    if out is None:
        out = torch.empty(base.shape, dtype=out_dtype)
    else:
        check_tensor(out, "out", "cpu")
        if out.dtype != out_dtype or out.numel() != base.numel():
            raise ValueError(f"out: expected {base.numel()} elements of {out_dtype}, got {out.numel()} of {out.dtype}")
    native.ties_map(base.data_ptr(), [x.data_ptr() for x in experts], in_code, base.numel(),
                    [float(w) for w in weights], [int(t) for t in thresh_keys], [int(c) for c in tie_cutoffs],
                    float(lambda_), bool(normalize), out.data_ptr(), out_code, bool(consensus),
                    [int(t) for t in inner_keys or ()], [int(c) for c in inner_cutoffs or ()])
    return out


def ties_tensor(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float],
                densities: Sequence[float], *, lambda_: float = 1.0, normalize: bool = True,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """TIES merge of one in-memory tensor (mergekit semantics, consensus by weighted sum, no rescale):
    per-expert exact top-``density`` trim of |x_j - base|, sign election, disjoint mean, lambda, + base.

    Two native histogram passes find the thresholds (``ties_thresholds``), a partial scan places the tie
    cutoffs when some ties must be split by flat index (``tie_cutoffs``), and one ``ties_map`` pass writes the
    output. Equals ``pymerge.ops.merge_tensors("ties", [base, *experts], ...).to(out_dtype)`` bit for bit.
    """
    thresholds = ties_thresholds(base, experts, densities)
    keys = [th.key for th in thresholds]
    cutoffs, _ = tie_cutoffs(base, experts, keys, [tie_budget(th) for th in thresholds])
    return ties_map(base, experts, weights, keys, cutoffs, lambda_=lambda_, normalize=normalize,
                    out_dtype=out_dtype)


# ---- DARE / DELLA (pymerge/methods/sparsify.py and task_arithmetic.py are the twin) ----

CONSENSUS_CODES = {None: 0, "sum": 1, "count": 2}


def per_expert(values: Sequence, k: int, what: str) -> list:
    values = list(values)
    if len(values) != k:
        raise ValueError(f"{what}: got {len(values)} values for {k} experts (one per expert)")
    return values


def dare_probs(probs: Sequence, like: torch.Tensor, device_type: str) -> tuple[list[float], list[int]]:
    """(scalar probabilities, probability buffer addresses) of the DARE/DELLA kernels: per expert a float keep
    probability (address 0) or a contiguous fp32 tensor of ``like``'s numel on ``like``'s device (DELLA)."""
    ps, ptrs = [], []
    for j, p in enumerate(probs):
        if isinstance(p, torch.Tensor):
            check_tensor(p, f"probs[{j}]", device_type)
            if p.dtype != torch.float32 or p.numel() != like.numel() or p.device != like.device:
                raise ValueError(f"probs[{j}]: expected {like.numel()} float32 probabilities on {like.device}")
            ps.append(0.0)
            ptrs.append(p.data_ptr())
        else:
            ps.append(float(p))
            ptrs.append(0)
    return ps, ptrs


def plain_divisor(weights: Sequence[float]) -> float:
    """The no-consensus divisor of the torch twin: fp32 weights summed in order in fp32, |.| < 1e-8 -> 1."""
    acc = torch.tensor(float(weights[0]), dtype=torch.float32)
    for w in weights[1:]:
        acc = acc + torch.tensor(float(w), dtype=torch.float32)
    return 1.0 if bool(acc.abs() < 1e-8) else float(acc)


class DareMapArgs(NamedTuple):
    """The per-expert arguments of the native DARE/DELLA map, as the CPU and CUDA bindings take them."""

    weights: list[float]
    scales: list[float]
    probs: list[float]
    prob_ptrs: list[int]
    model_ids: list[int]
    consensus: int
    divisor: float


def dare_map_args(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], probs: Sequence,
                  scales: Optional[Sequence[float]], model_ids: Sequence[int], consensus: Optional[str],
                  device_type: str) -> DareMapArgs:
    """Checked per-expert arguments of ``dare_map`` (shared by native_cpu and native_cuda; the tensors
    themselves are checked by the caller)."""
    k = len(experts)
    if consensus not in CONSENSUS_CODES:
        raise ValueError(f"consensus: expected 'sum', 'count' or None, got {consensus!r}")
    ws = [float(w) for w in per_expert(weights, k, "weights")]
    ps, ptrs = dare_probs(per_expert(probs, k, "probs"), base, device_type)
    sc = [1.0] * k if scales is None else [float(s) for s in per_expert(scales, k, "scales")]
    ids = [int(m) & _MASK32 for m in per_expert(model_ids, k, "model_ids")]
    return DareMapArgs(ws, sc, ps, ptrs, ids, CONSENSUS_CODES[consensus], plain_divisor(ws))


def dare_map(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], *, seed: int,
             model_ids: Sequence[int], tensor_name: str, probs: Sequence, scales: Optional[Sequence[float]] = None,
             start: int = 0, consensus: Optional[str] = "sum", normalize: bool = False, lambda_: float = 1.0,
             out_dtype: Optional[torch.dtype] = None,
             keep_bits: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """The DARE / DELLA map on CPU tensors in one fused pass (formula in csrc/include/pymerge/cpu_kernels.h):
    Philox keep masks, ``scales`` (the L1 rescale), weights, sign election (``consensus``: "sum", "count" or
    None), normalize, lambda, + base, narrowed to ``out_dtype`` (default base's dtype).

    ``probs``: per expert a float keep probability (DARE; 1.0 keeps everything) or a contiguous fp32 tensor of
    base's numel (DELLA's per-element probabilities). ``start``: flat index of base's first element in the
    whole tensor (the mask stream position). ``keep_bits``: per expert None or the mask bits ``dare_l1_rows``
    wrote for this very chunk (same probs, seed, ids and start), used instead of drawing the mask again.
    Bit-identical to the torch generalized task arithmetic with the random / della_magprune sparsifier given
    the same scales, and to ``native_cuda.dare_map``.
    """
    from .philox import name_hash

    native = require_cpu("the native CPU DARE map")
    _check_same(experts, "experts", base)
    a = dare_map_args(base, experts, weights, probs, scales, model_ids, consensus, "cpu")
    bit_ptrs = _keep_bit_ptrs(keep_bits, len(experts), (base.numel() + 7) // 8)
    out = torch.empty(base.shape, dtype=base.dtype if out_dtype is None else out_dtype)
    native.dare_map(base.data_ptr(), [x.data_ptr() for x in experts], dtype_code(base.dtype, "base"), base.numel(),
                    a.weights, a.scales, a.probs, a.prob_ptrs, int(seed) & _MASK64, a.model_ids,
                    name_hash(tensor_name), int(start), a.consensus, bool(normalize), a.divisor, float(lambda_),
                    out.data_ptr(), dtype_code(out.dtype, "out_dtype"), bit_ptrs)
    return out


def _keep_bit_ptrs(keep_bits: Optional[Sequence[Optional[torch.Tensor]]], k: int, nbytes: int) -> list[int]:
    """The binding's per-expert mask-bit addresses (0 for none; [] without any), each buffer checked."""
    if keep_bits is None:
        return []
    ptrs = []
    for j, b in enumerate(per_expert(keep_bits, k, "keep_bits")):
        if b is None:
            ptrs.append(0)
            continue
        check_tensor(b, f"keep_bits[{j}]", "cpu")
        if b.dtype != torch.uint8 or b.numel() != nbytes or not b.is_contiguous():
            raise ValueError(f"keep_bits[{j}]: expected a contiguous uint8 tensor of {nbytes} bytes, got {b.dtype} "
                             f"{tuple(b.shape)}")
        ptrs.append(b.data_ptr())
    return ptrs


def dare_l1_rows(base: torch.Tensor, experts: Sequence[torch.Tensor], *, seed: int, model_ids: Sequence[int],
                 tensor_name: str, probs: Sequence, start: int = 0,
                 keep_bits: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """[k, rows, 2] float64: per expert and row of the [rows, cols] chunk, (sum |t|, sum |t| * keep) with
    t = x - base in fp32 and keep the expert's Philox mask (``probs`` and ``start`` as in ``dare_map``), each
    summed in fp64 in eight interleaved lanes (``pymerge.ops.exact_sum.lane_row_sums`` is the twin's order).
    ``base`` and ``experts`` are 2-D (a vector is one row). ``keep_bits`` (cols a multiple of 8): per expert
    None or a uint8 tensor of rows * cols / 8 bytes that receives the mask, element e as bit e % 8 of byte
    e // 8, for ``dare_map``."""
    from .philox import name_hash

    native = require_cpu("the native CPU DARE L1 norms")
    _check_same(experts, "experts", base)
    if base.dim() != 2:
        raise ValueError(f"base: expected a [rows, cols] chunk, got shape {tuple(base.shape)}")
    k = len(experts)
    rows, cols = base.shape
    ps, ptrs = dare_probs(per_expert(probs, k, "probs"), base, "cpu")
    bit_ptrs = _keep_bit_ptrs(keep_bits, k, rows * cols // 8)
    out = torch.empty((k, rows, 2), dtype=torch.float64)
    native.dare_l1_rows(base.data_ptr(), [x.data_ptr() for x in experts], dtype_code(base.dtype, "base"), rows,
                        cols, ps, ptrs, int(seed) & _MASK64,
                        [int(m) & _MASK32 for m in per_expert(model_ids, k, "model_ids")], name_hash(tensor_name),
                        int(start), out.data_ptr(), bit_ptrs)
    return out


def della_probs(base: torch.Tensor, x: torch.Tensor, density: float, epsilon: float, *,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DELLA's fp32 keep probabilities for a [rows, cols] chunk ranked along each row: fp32(d - eps) + fp32(2 eps)
    * rank / (cols - 1), rank the stable ascending rank of |x - base| in its row. Bit-identical to
    ``pymerge.methods.sparsify.della_probabilities(x.float() - base.float(), density, epsilon, cols)``. ``out``
    (a contiguous fp32 tensor of the chunk's shape) receives them when given."""
    native = require_cpu("the native CPU DELLA ranks")
    _check_same([x], "x", base)
    if base.dim() != 2:
        raise ValueError(f"base: expected a [rows, cols] chunk, got shape {tuple(base.shape)}")
    rows, cols = base.shape
    low = float(torch.tensor(density - epsilon, dtype=torch.float32))  # the twin's fp32 constants
    span = float(torch.tensor(2 * epsilon, dtype=torch.float32))
    if out is None:
        out = torch.empty((rows, cols), dtype=torch.float32)
    else:
        check_tensor(out, "out", "cpu")
        if out.dtype != torch.float32 or tuple(out.shape) != (rows, cols) or not out.is_contiguous():
            raise ValueError(f"out: expected a contiguous float32 tensor of shape {(rows, cols)}, got {out.dtype} "
                             f"{tuple(out.shape)}")
    native.della_probs(base.data_ptr(), x.data_ptr(), dtype_code(base.dtype, "base"), rows, cols, low, span,
                       out.data_ptr())
    return out
