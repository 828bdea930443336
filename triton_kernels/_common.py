"""Device helpers shared by the Triton kernels: exact output rounding, magnitude keys, Philox4x32-10.

Each helper is the Triton twin of a function in ``csrc/include/pymerge`` (dtype_cast.h, radix_select.h,
philox.h) and gives the same bits on the GPU and in the interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Philox4x32-10 constants (philox.h): round multipliers and Weyl key increments (constexpr: read by kernels).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even on the bits; NaN keeps sign and top payload, quiet bit set.

    The interpreter's own bf16 conversion truncates, so every mode uses this (on the GPU it equals cvt.rn).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_rounded(ptr, value, mask):
    """Stores fp32 ``value`` at ``ptr`` in the pointer's element type, rounding to nearest even."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, to_bf16_rne(value), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def magnitude_key(t):
    """int32 key monotone in |t| for fp32 ``t``: the bit pattern of |t| (sign cleared), in [0, 2^31)."""
    return (t.to(tl.uint32, bitcast=True) & 0x7FFFFFFF).to(tl.int32, bitcast=True)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """The four output words of Philox4x32-10 for uint32 counter words c0..c3 under the key (k0, k1).

    Uses builtins only: the interpreter cannot run tl.standard helpers decorated before it was switched on.
    """
    m0 = tl.full((), PHILOX_M0, tl.uint32)
    m1 = tl.full((), PHILOX_M1, tl.uint32)
    w0 = tl.full((), PHILOX_W0, tl.uint32)
    w1 = tl.full((), PHILOX_W1, tl.uint32)
    for r in tl.static_range(10):
        if r > 0:  # the key schedule bumps the key before every round but the first
            k0 = k0 + w0
            k1 = k1 + w1
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


@triton.jit
def philox_tile(pid, phase, block0, n, name_hash, BLOCK: tl.constexpr):
    """The [BLOCK // 4, 4] tile of program ``pid``, aligned to Philox blocks of the tensor's flat index: row =
    one Philox block (counter block0 + pid * BLOCK / 4 + row), column = its lane; element i = pid * BLOCK -
    phase + 4 * row + lane of the call, phase = start % 4. Returns (i, mask, c0, c1, c3, lane); the caller adds
    the model word c2 (one per expert) and draws with ``uniform24``."""
    ROWS: tl.constexpr = BLOCK // 4
    row = tl.arange(0, ROWS).to(tl.int64)[:, None]
    lane = tl.arange(0, 4)[None, :]
    i = pid.to(tl.int64) * BLOCK - phase.to(tl.int64) + 4 * row + lane
    mask = (i >= 0) & (i < n)
    counter = block0.to(tl.int64) + pid.to(tl.int64) * ROWS + row
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c3 = tl.full(c0.shape, 0, tl.uint32) + name_hash.to(tl.uint32)
    return i, mask, c0, c1, c3, lane


@triton.jit
def uniform24(c0, c1, c2, c3, k0, k1, lane):
    """float(word >> 8) of each lane's Philox word (24 bits: exact in fp32), as ``pymerge.ops.philox``."""
    w0, w1, w2, w3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return (word >> 8).to(tl.float32)
