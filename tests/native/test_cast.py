"""pymerge._C casts (via pymerge.ops.native_cpu.cast) against torch's own `.to()`, bit for bit.

Every non-NaN result must have exactly torch's bits. NaN bit patterns are not comparable (torch's scalar
and vector paths produce different ones), so there we check NaN -> NaN with the sign kept and, on
narrowing, the quiet bit set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason

pytestmark = pytest.mark.skipif(
    native_module() is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 1023, 65537, 200003]  # 200003: several 64K OpenMP blocks plus a ragged tail
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from pymerge.ops import native_cpu

    return native_cpu.cast(x, dtype)


def _bits(x: torch.Tensor) -> np.ndarray:
    """Unsigned bit patterns of a float tensor, as int64 for easy comparison."""
    raw = x.contiguous().view(_INT_VIEW[x.dtype]).numpy().astype(np.int64)
    return raw & (0xFFFFFFFF if x.dtype == torch.float32 else 0xFFFF)


def _from_bits(bits, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float32:
        return torch.from_numpy(np.asarray(bits, dtype=np.uint32).view(np.int32).copy()).view(torch.float32)
    return torch.from_numpy(np.asarray(bits, dtype=np.uint16).view(np.int16).copy()).view(dtype)


def assert_cast_matches_torch(x: torch.Tensor, dtype: torch.dtype) -> None:
    out = _cast(x, dtype)
    ref = x.to(dtype)
    assert out.dtype == dtype and out.shape == x.shape
    got, want = _bits(out), _bits(ref)
    nan_in = torch.isnan(x).numpy().reshape(-1)
    nan_out = torch.isnan(out).numpy().reshape(-1)
    np.testing.assert_array_equal(nan_out, nan_in, err_msg="NaN must map to NaN and nothing else")
    bad = np.flatnonzero((got != want).reshape(-1) & ~nan_in)
    if bad.size:
        i = int(bad[0])
        pytest.fail(
            f"{x.dtype}->{dtype}: {bad.size} of {x.numel()} elements differ from torch; first at {i}: "
            f"input bits {_bits(x).reshape(-1)[i]:#x} -> got {got.reshape(-1)[i]:#x}, "
            f"torch {want.reshape(-1)[i]:#x}"
        )
    if nan_in.any():
        np.testing.assert_array_equal(
            got.reshape(-1)[nan_in], expected_nan_bits(_bits(x).reshape(-1)[nan_in], x.dtype, dtype),
            err_msg=f"{x.dtype}->{dtype}: NaN bits differ from our documented NaN contract",
        )


def expected_nan_bits(bits: np.ndarray, src: torch.dtype, dst: torch.dtype) -> np.ndarray:
    """Our NaN contract (dtype_cast.h): sign kept, payload kept from the top, quiet bit set, except that
    bf16 -> f32 is a plain bit extension (as in torch) and a same-dtype cast is a copy."""
    if src == dst:
        return bits
    if src == torch.bfloat16:
        f32 = bits << 16
    elif src == torch.float16:
        f32 = ((bits & 0x8000) << 16) | 0x7F800000 | ((bits & 0x3FF) << 13) | 0x00400000
    else:
        f32 = bits
    if dst == torch.float32:
        return f32
    if dst == torch.bfloat16:
        return (f32 >> 16) | 0x0040
    return ((f32 >> 16) & 0x8000) | 0x7E00 | ((f32 >> 13) & 0x3FF)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_random_values_all_pairs(src, dst, size):
    g = torch.Generator().manual_seed(size * 7 + 3)
    # A wide range of magnitudes: normal(0,1) scaled by 2^[-30, 30], so every path (subnormal, normal,
    # overflow for the 16-bit formats) is hit.
    x = torch.randn(size, generator=g) * torch.exp2(torch.randint(-30, 31, (size,), generator=g).float())
    assert_cast_matches_torch(x.to(src), dst)


@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16])
def test_every_16bit_pattern_widens_and_converts_exactly(src):
    x = _from_bits(np.arange(1 << 16), src)  # all 65536 values: subnormals, Inf, every NaN
    for dst in DTYPES:
        assert_cast_matches_torch(x, dst)


def test_random_f32_bit_patterns_narrow_exactly():
    # Uniform over all 2^32 patterns: every exponent, sign, NaN payload and mantissa tail.
    g = np.random.default_rng(1)
    x = _from_bits(g.integers(0, 1 << 32, size=300007, dtype=np.uint64), torch.float32)
    for dst in (torch.float16, torch.bfloat16):
        assert_cast_matches_torch(x, dst)


def test_dense_grid_through_f16_subnormals_and_ties():
    # k * 2^-27 for k < 2^18: every f16 subnormal, each rounding tie between them (multiples of 2^-25
    # that are odd), and the switch to normal f16 at 2^-14; both signs.
    k = torch.arange(1 << 18, dtype=torch.float64)
    x = torch.cat([k, -k]).mul(2.0**-27).float()
    assert_cast_matches_torch(x, torch.float16)
    assert_cast_matches_torch(x, torch.bfloat16)


SPECIAL_F32_BITS = [
    0x00000000, 0x80000000,  # +-0
    0x00000001, 0x80000001, 0x007FFFFF, 0x00800000,  # f32 subnormals, smallest normal
    0x3F800000, 0xBF800000,  # +-1
    0x7F7FFFFF, 0xFF7FFFFF,  # max finite f32: Inf in both 16-bit formats
    0x7F800000, 0xFF800000,  # +-Inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7F812345, 0x7FFFFFFF,  # NaNs (some signaling)
    # bf16 ties (low 16 bits 0x8000): even kept part stays, odd rounds up; and the neighbours.
    0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F807FFF, 0x3F808001,
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # bf16 max finite 0x7F7F: below / at / above the overflow tie
    # f16 ties (low 13 bits 0x1000) with even and odd kept parts, and neighbours.
    0x3F801000, 0x3F803000, 0x3F800FFF, 0x3F801001,
    0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # 65504, just below/at 65520, 65536
    0x38800000, 0x387FFFFF, 0x387FF000, 0x387FE000,  # 2^-14 (min normal f16) and just below
    0x33800000, 0x33000000, 0x33000001, 0x32FFFFFF,  # 2^-24 (min subnormal), 2^-25 tie -> 0, either side
    0x33C00000, 0x34200000,  # 1.5 * 2^-24 (tie -> 2^-23), 2.5 * 2^-24 (tie -> 2^-23)
    0x387FC000,  # max f16 subnormal 1023 * 2^-24
]


def test_special_f32_values():
    bits = SPECIAL_F32_BITS + [b ^ 0x80000000 for b in SPECIAL_F32_BITS]
    x = _from_bits(bits, torch.float32)
    for dst in DTYPES:
        assert_cast_matches_torch(x, dst)


def test_known_results_independent_of_torch():
    # A few hand-checked answers, so a torch regression cannot hide one of ours.
    bits = [0x3F808000, 0x3F818000, 0x477FF000, 0x33000000, 0x33000001, 0x33C00000, 0x7F800001]
    x = _from_bits(bits, torch.float32)
    assert _bits(_cast(x, torch.bfloat16)).tolist()[:6] == [0x3F80, 0x3F82, 0x4780, 0x3300, 0x3300, 0x33C0]
    assert _bits(_cast(x, torch.float16)).tolist()[:6] == [0x3C04, 0x3C0C, 0x7C00, 0x0000, 0x0001, 0x0002]
    assert _bits(_cast(x, torch.bfloat16))[6] == 0x7FC0  # signaling NaN: quiet, not rounded into Inf
    assert _bits(_cast(x, torch.float16))[6] == 0x7E00


def test_shape_is_kept_and_input_untouched():
    x = torch.randn(3, 5, 7)
    before = x.clone()
    out = _cast(x, torch.bfloat16)
    assert out.shape == (3, 5, 7)
    assert torch.equal(x, before)


def test_argument_errors():
    from pymerge.ops import native_cpu

    with pytest.raises(ValueError, match="contiguous"):
        native_cpu.cast(torch.randn(4, 6).t(), torch.float16)
    with pytest.raises(ValueError, match="cpu tensor"):
        native_cpu.cast(torch.empty(3, device="meta"), torch.float16)
    with pytest.raises(TypeError, match="not supported"):
        native_cpu.cast(torch.zeros(3, dtype=torch.float64), torch.float16)
    with pytest.raises(TypeError, match="not supported"):
        native_cpu.cast(torch.zeros(3), torch.int8)
    with pytest.raises(TypeError, match="torch.Tensor"):
        native_cpu.cast([1.0, 2.0], torch.float16)
