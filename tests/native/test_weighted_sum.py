"""pymerge._C weighted sum (via pymerge.ops.native_cpu.weighted_sum) against two pure-torch twins.

1. Float64 twin (independent of our summation order): ``torch.stack`` in float64 with the exact weights,
   then one cast. Tolerance: recursive fp32 summation of k products, with the weights rounded to fp32
   and one division, is off from the exact value by at most (k + 3) * 2^-24 * sum_j |w_j x_j| (divided by
   |sum w| when normalizing), a Higham-style bound with one unit roundoff per product, add, weight
   rounding and division; the final cast then adds at most one unit in the last place of the output
   dtype (half an ulp for the rounding, half for an fp32 value that crossed a rounding boundary).
2. Float32 twin of our exact formula (acc = w0*x0; acc = acc + wj*xj in order; / sum; cast), which must
   match bit for bit: this pins the order and rounding that make CPU, CUDA and Triton agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason

pytestmark = pytest.mark.skipif(
    native_module() is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}"
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 65537, 200003]
_MANTISSA_BITS = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
_MIN_EXPONENT = {torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}


def _weighted_sum(xs, weights, **kw):
    from pymerge.ops import native_cpu

    return native_cpu.weighted_sum(xs, weights, **kw)


def twin_f32(xs, weights, normalize, out_dtype):
    """Our formula in plain torch ops (each op rounds to fp32 on its own; torch never fuses them on CPU)."""
    w32 = [torch.tensor(w, dtype=torch.float32) for w in weights]
    acc = w32[0] * xs[0].float()
    for w, x in zip(w32[1:], xs[1:]):
        acc = acc + w * x.float()
    if normalize:
        total = 0.0
        for w in weights:  # float64, in order (not sum(): Python 3.12 compensates)
            total += w
        acc = acc / torch.tensor(total, dtype=torch.float32)
    return acc.to(out_dtype)


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unit in the last place of `dtype` at magnitude |v| (float64), subnormal spacing near zero."""
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** _MIN_EXPONENT[dtype])))
    return torch.exp2(exponent.clamp_min(_MIN_EXPONENT[dtype]) - _MANTISSA_BITS[dtype])


def assert_close_to_f64_twin(out, xs, weights, normalize):
    stacked = torch.stack([x.double() for x in xs])
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * xs[0].dim()))
    exact = (stacked * w).sum(0)
    scale = (stacked * w).abs().sum(0)
    if normalize:
        exact, scale = exact / sum(weights), scale / abs(sum(weights))
    bound = (len(xs) + 3) * 2.0**-24 * scale
    tol = bound + ulp(exact.abs() + bound, out.dtype)
    err = (out.double() - exact).abs()
    worst = int(torch.argmax(err - tol))
    assert bool((err <= tol).all()), (
        f"element {worst}: got {out.reshape(-1)[worst].item()!r}, exact {exact.reshape(-1)[worst].item()!r}, "
        f"error {err.reshape(-1)[worst].item():.3g} > tolerance {tol.reshape(-1)[worst].item():.3g}"
    )


def assert_bit_equal(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    view = torch.int32 if out.dtype == torch.float32 else torch.int16
    diff = (out.view(view) != ref.view(view)) & ~(torch.isnan(out) & torch.isnan(ref))
    if bool(diff.any()):
        i = int(diff.reshape(-1).nonzero()[0])
        pytest.fail(f"{int(diff.sum())} elements differ from the fp32 twin; first at {i}: "
                    f"got {out.reshape(-1)[i].item()!r}, twin {ref.reshape(-1)[i].item()!r}")


def _inputs(k, size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(size, generator=g).to(dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) * 2.0 - 0.5).tolist()  # some negative
    return xs, weights


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_random_inputs_all_dtype_pairs(in_dtype, out_dtype, size, normalize):
    k = {1: 1, 7: 2, 1023: 3, 65537: 5, 200003: 4}[size]
    xs, weights = _inputs(k, size, in_dtype, seed=size + k)
    if normalize and abs(sum(weights)) < 0.1:
        weights[0] += 1.0  # keep the divisor away from 0 so the bound stays meaningful
    out = _weighted_sum(xs, weights, normalize=normalize, out_dtype=out_dtype)
    assert_bit_equal(out, twin_f32(xs, weights, normalize, out_dtype))
    assert_close_to_f64_twin(out, xs, weights, normalize)


@pytest.mark.parametrize("k", range(1, 10))
def test_input_counts(k):
    xs, weights = _inputs(k, 4097, torch.bfloat16, seed=100 + k)
    weights[0] += 1.0
    for normalize in (False, True):
        out = _weighted_sum(xs, weights, normalize=normalize, out_dtype=torch.float32)
        assert_bit_equal(out, twin_f32(xs, weights, normalize, torch.float32))
        assert_close_to_f64_twin(out, xs, weights, normalize)


def test_shape_and_default_out_dtype():
    xs, weights = _inputs(3, 2 * 3 * 11, torch.float16, seed=5)
    xs = [x.view(2, 3, 11) for x in xs]
    out = _weighted_sum(xs, weights)
    assert out.shape == (2, 3, 11) and out.dtype == torch.float16
    assert_bit_equal(out, twin_f32(xs, weights, False, torch.float16))


def test_special_values():
    inf, nan = math.inf, math.nan
    x0 = torch.tensor([-0.0, 0.0, inf, -inf, nan, 1.0, 3e38, 1e-45, 65504.0])
    x1 = torch.tensor([0.0, -0.0, 1.0, inf, 1.0, nan, 3e38, 1e-45, 65504.0])
    # One input with weight 1: exactly the cast of the input (-0 stays -0: the sum starts from the first
    # product, not from +0).
    for dtype in DTYPES:
        assert_bit_equal(_weighted_sum([x0], [1.0], out_dtype=dtype), x0.to(dtype))
    out = _weighted_sum([x0, x1], [1.0, 1.0], out_dtype=torch.float32)
    want = [0.0, 0.0, inf, nan, nan, nan, inf, 2 * x0[7].item(), 131008.0]
    for got, exp in zip(out.tolist(), want):
        assert (math.isnan(got) and math.isnan(exp)) or got == exp
    assert math.copysign(1.0, out[0].item()) == 1.0  # -0 + 0 = +0 in round-to-nearest
    # 65504 + 65504 overflows float16 to Inf, and halves back to 65504 when normalized.
    assert _weighted_sum([x0, x1], [1.0, 1.0], out_dtype=torch.float16)[8].item() == inf
    assert _weighted_sum([x0, x1], [1.0, 1.0], normalize=True, out_dtype=torch.float16)[8].item() == 65504.0


def test_empty_tensors():
    out = _weighted_sum([torch.empty(0, 4), torch.empty(0, 4)], [0.5, 0.5], normalize=True)
    assert out.shape == (0, 4)


def test_argument_errors():
    from pymerge.ops import native_cpu

    a, b = torch.randn(5), torch.randn(5)
    with pytest.raises(ValueError, match="non-empty"):
        native_cpu.weighted_sum([], [])
    with pytest.raises(ValueError, match="2 weights for 1 tensors"):
        native_cpu.weighted_sum([a], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        native_cpu.weighted_sum([a, torch.randn(6)], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        native_cpu.weighted_sum([a, b.half()], [1.0, 1.0])
    with pytest.raises(ValueError, match="contiguous"):
        native_cpu.weighted_sum([a, torch.randn(10)[::2]], [1.0, 1.0])
    with pytest.raises(TypeError, match="not supported"):
        native_cpu.weighted_sum([a.double(), b.double()], [1.0, 1.0])
    with pytest.raises(TypeError, match="out_dtype"):
        native_cpu.weighted_sum([a, b], [1.0, 1.0], out_dtype=torch.int32)
    with pytest.raises(ValueError, match="non-zero finite weight sum"):
        native_cpu.weighted_sum([a, b], [1.0, -1.0], normalize=True)
    with pytest.raises(ValueError, match="finite"):
        native_cpu.weighted_sum([a, b], [1.0, math.nan])
    with pytest.raises(ValueError, match="finite"):
        native_cpu.weighted_sum([a, b], [1.0, 1e39])  # overflows float32
