"""pymerge.triton_kernels.weighted_sum against the fp32 twin of our formula (bit for bit) and the native
CPU kernel. Without a GPU the kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1),
so sizes stay small. Skipped when Triton is not installed (pip install 'pymerge[triton]').

This folder is not named tests/triton: pytest puts tests/ on sys.path, and a package named `triton`
there would shadow the real one.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'pymerge[triton]')")

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before the import below

import triton  # noqa: E402

from pymerge.triton_kernels import triton_unavailable_reason  # noqa: E402
from pymerge.triton_kernels import weighted_sum as tws  # noqa: E402

if not ON_GPU and not isinstance(tws._weighted_sum_kernel, triton.runtime.interpreter.InterpretedFunction):
    tws = importlib.reload(tws)  # imported earlier without the interpreter: decorate the kernels again

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def twin_f32(xs, weights, normalize, out_dtype):
    """Our formula in plain torch ops: acc = w0*x0; acc = acc + wj*xj; / (float64 sum -> fp32); cast."""
    w32 = [torch.tensor(w, dtype=torch.float32) for w in weights]
    acc = w32[0] * xs[0].float()
    for w, x in zip(w32[1:], xs[1:]):
        acc = acc + w * x.float()
    if normalize:
        total = 0.0
        for w in weights:
            total += w
        acc = acc / torch.tensor(total, dtype=torch.float32)
    return acc.to(out_dtype)


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


def assert_bit_equal(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    same = (_bits(got) == _bits(want)) | (torch.isnan(got) & torch.isnan(want))
    if not bool(same.all()):
        i = int((~same).reshape(-1).nonzero()[0])
        pytest.fail(f"{int((~same).sum())} elements differ; first at {i}: got {got.reshape(-1)[i].item()!r}, "
                    f"want {want.reshape(-1)[i].item()!r}")


def test_triton_is_reported_available():
    assert triton_unavailable_reason() is None


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("size,k", [(1, 1), (7, 2), (1023, 4), (4099, 5), (2053, 9)])
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_matches_fp32_twin(in_dtype, out_dtype, size, k, normalize):
    g = torch.Generator().manual_seed(size * 31 + k)
    xs = [(torch.randn(size, generator=g) * 3).to(in_dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) * 2.0 - 0.4).tolist()
    if normalize and abs(sum(weights)) < 0.1:
        weights[0] += 1.0
    got = tws.weighted_sum([x.to(DEVICE) for x in xs], weights, normalize=normalize, out_dtype=out_dtype)
    assert got.device.type == DEVICE
    assert_bit_equal(got.cpu(), twin_f32(xs, weights, normalize, out_dtype))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, in the interpreter
def test_special_values_and_bf16_rounding():
    inf, nan = math.inf, math.nan
    # 1 + 2^-8 + 2^-16 sits just above a bf16 tie: truncation (the interpreter's own bf16 store) gives 1.0,
    # round-to-nearest-even gives 1 + 2^-7.
    x0 = torch.tensor([-0.0, inf, -inf, nan, 3e38, 1.0 + 2.0**-8 + 2.0**-16, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8])
    for out_dtype in DTYPES:
        got = tws.weighted_sum([x0.to(DEVICE)], [1.0], out_dtype=out_dtype).cpu()
        assert_bit_equal(got, x0.to(out_dtype))
    got = tws.weighted_sum([x0.to(DEVICE)], [1.0], out_dtype=torch.bfloat16).cpu()
    assert got[5].item() == 1.0 + 2.0**-7 and got[6].item() == 1.0 and got[7].item() == 1.0 + 2.0**-6


def test_matches_native_cpu_kernel():
    from pymerge._native import native_module
    from pymerge.ops import native_cpu

    if native_module() is None:
        pytest.skip("pymerge._C is not built")
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(3001, generator=g).to(torch.bfloat16) for _ in range(6)]
    weights = [0.3, -0.1, 0.25, 0.7, 0.05, 0.2]
    for normalize in (False, True):
        got = tws.weighted_sum([x.to(DEVICE) for x in xs], weights, normalize=normalize, out_dtype=torch.bfloat16)
        want = native_cpu.weighted_sum(xs, weights, normalize=normalize, out_dtype=torch.bfloat16)
        assert_bit_equal(got.cpu(), want)


def test_shapes_and_empty():
    xs = [torch.randn(3, 5, 7).to(DEVICE) for _ in range(2)]
    out = tws.weighted_sum(xs, [0.5, 0.5])
    assert out.shape == (3, 5, 7) and out.dtype == torch.float32
    assert tws.weighted_sum([torch.empty(0, 3, device=DEVICE)], [1.0]).shape == (0, 3)


def test_argument_errors():
    a = torch.randn(4, device=DEVICE)
    with pytest.raises(ValueError, match="non-empty"):
        tws.weighted_sum([], [])
    with pytest.raises(ValueError, match="2 weights for 1 tensors"):
        tws.weighted_sum([a], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        tws.weighted_sum([a, a.half()], [1.0, 1.0])
    with pytest.raises(TypeError, match="not supported"):
        tws.weighted_sum([a], [1.0], out_dtype=torch.float64)
    with pytest.raises(ValueError, match="non-zero finite weight sum"):
        tws.weighted_sum([a, a], [1.0, -1.0], normalize=True)
    with pytest.raises(ValueError, match="finite"):
        tws.weighted_sum([a], [math.inf])
