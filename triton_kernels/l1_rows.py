"""Triton DARE/DELLA L1 row sums: per row of a chunk, (sum |t|, sum |t| * keep) in fp64, t = x - base in fp32.

The keep mask is drawn inline, bit-identical to ``pymerge.ops.philox.keep_mask`` (element (r, c) of a chunk whose
first element is flat element ``start`` of the tensor draws word start + r * cols + c of the stream (seed, model,
name_hash(tensor name)); keep iff float(word >> 8) < fp32(p) * 2^24). The sums are taken in the order of
``pymerge.ops.exact_sum.lane_row_sums``: eight fp64 lanes, lane l adding columns c = l (mod 8) in increasing
order from 0.0, combined as ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)); the native CPU L1 pass
(``native_cpu.dare_l1_rows``) adds in the same order, so the rescale factors of a GPU merge with these kernels
equal the CPU backend's to the bit. ``torch.sum`` on a GPU picks an order of its own: with it, DELLA merges of
the demo family on an H100 differed from the CPU output in 424 of 99.5M elements (one bf16 step each).
"""

from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl

from ._args import check_contiguous, check_dtype, keep_limit
from ._common import uniform24

BLOCK_ROWS = 64  # rows per program; each of a row's 8 lanes adds its columns in order, so rows are the parallelism
_MASK32 = 0xFFFFFFFF


@triton.jit
def _combine_lanes(s):
    """((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)) of each row of a [R, 8] tile, as lane_row_sums."""
    R: tl.constexpr = s.shape[0]
    a, b = tl.split(tl.reshape(s, (R, 4, 2)))  # pairs (s0, s1), (s2, s3), (s4, s5), (s6, s7)
    p = a + b
    a, b = tl.split(tl.reshape(p, (R, 2, 2)))  # (p0, p1), (p2, p3)
    q = a + b
    a, b = tl.split(q)
    return a + b


@triton.jit(do_not_specialize=["rows", "cols", "start", "key0", "key1", "model", "name_hash", "limit"])
def _l1_rows_kernel(base_ptr, x_ptr, p_ptr, out_ptr, rows, cols, start, key0, key1, model, name_hash, limit,
                    PER_ELEMENT: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)[:, None]
    lane = tl.arange(0, 8).to(tl.int64)[None, :]
    in_rows = r < rows
    row0 = r * cols
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    c2 = tl.full((BLOCK_R, 8), 0, tl.uint32) + model.to(tl.uint32)
    c3 = tl.full((BLOCK_R, 8), 0, tl.uint32) + name_hash.to(tl.uint32)
    sum_a = tl.full((BLOCK_R, 8), 0.0, tl.float64)  # tl.full, not tl.zeros: builtins only (_common.py)
    sum_k = tl.full((BLOCK_R, 8), 0.0, tl.float64)
    for c0 in range(0, cols, 8):
        c = c0 + lane
        mask = in_rows & (c < cols)
        i = row0 + c
        b = tl.load(base_ptr + i, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        a = tl.abs(x - b)
        g = start.to(tl.int64) + i  # flat element of the tensor: Philox block g // 4, word g % 4
        block = g >> 2
        u = uniform24((block & 0xFFFFFFFF).to(tl.uint32), (block >> 32).to(tl.uint32), c2, c3, k0, k1, g & 3)
        if PER_ELEMENT:
            lim = tl.load(p_ptr + i, mask=mask, other=0.0) * 16777216.0  # exact: times 2^24
        else:
            lim = limit
        keep = (u < lim).to(tl.float32)
        # padding columns add +0.0, as lane_row_sums' zero padding; a * keep (not a select) keeps a NaN a NaN
        sum_a += a.to(tl.float64)
        sum_k += (a * keep).to(tl.float64)
    rr = r.reshape(BLOCK_R)
    ok = rr < rows
    tl.store(out_ptr + 2 * rr, _combine_lanes(sum_a), mask=ok)
    tl.store(out_ptr + 2 * rr + 1, _combine_lanes(sum_k), mask=ok)


def l1_rows(base: torch.Tensor, x: torch.Tensor, *, seed: int, model: int, tensor_name: str, start: int,
            prob: Union[float, torch.Tensor]) -> torch.Tensor:
    """[rows, 2] fp64: per row of ``base`` and ``x`` ([rows, cols], same dtype and device, contiguous), the sums
    of |x - base| and of |x - base| * keep (formula and order in the module docstring). ``prob``: one keep
    probability, or a contiguous fp32 tensor of rows * cols per-element probabilities (DELLA). ``start``: flat
    index of the chunk's first element in the whole tensor."""
    from pymerge.ops.philox import name_hash

    check_contiguous(base, "base")
    check_contiguous(x, "x")
    check_dtype(base.dtype, "base")
    if base.dim() != 2 or x.shape != base.shape or x.dtype != base.dtype or x.device != base.device:
        raise ValueError(f"x: expected the [rows, cols] shape, dtype and device of base "
                         f"{tuple(base.shape)} {base.dtype} on {base.device}, got {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}")
    start = int(start)
    if start < 0:
        raise ValueError(f"start: must be >= 0, got {start}")
    rows, cols = base.shape
    out = torch.empty(rows, 2, dtype=torch.float64, device=base.device)
    p_tensor, limit = keep_limit(prob, rows * cols, base.device)
    if rows == 0:
        return out
    seed = int(seed) & ((1 << 64) - 1)
    _l1_rows_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        base, x, base if p_tensor is None else p_tensor, out, rows, cols, start, seed & _MASK32, seed >> 32,
        int(model) & _MASK32, name_hash(tensor_name) & _MASK32, limit, PER_ELEMENT=p_tensor is not None,
        BLOCK_R=BLOCK_ROWS,
        enable_fp_fusion=False)
    return out
