"""pymerge._C CUDA kernels (via pymerge.ops.native_cuda): bit-identical to torch's casts and to the CPU
kernels. The GPU tests are marked `gpu` and skip without a usable GPU; the availability checks run
everywhere."""

from __future__ import annotations

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason
from pymerge.errors import BackendUnavailable

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 65537, 1_000_003]


def _cuda_reason():
    from pymerge.ops import native_cuda

    return native_cuda.cuda_unavailable_reason() if _C is not None else "pymerge._C is not built"


needs_gpu = pytest.mark.skipif(
    _C is None or not torch.cuda.is_available() or _cuda_reason() is not None,
    reason=f"native CUDA kernels cannot run here: {_cuda_reason() if _C is not None else 'no pymerge._C'}",
)


def test_unusable_cuda_is_a_clear_error():
    from pymerge.ops import native_cuda

    reason = native_cuda.cuda_unavailable_reason()
    if reason is None:
        pytest.skip("the native CUDA kernels are usable here")
    with pytest.raises(BackendUnavailable, match="native CUDA cast is unavailable"):
        native_cuda.cast(torch.zeros(3), torch.float16)
    with pytest.raises(BackendUnavailable, match="native CUDA weighted_sum is unavailable"):
        native_cuda.weighted_sum([torch.zeros(3)], [1.0])


def test_cuda_launchers_exist_exactly_when_compiled():
    info = _C.build_info()
    if info["cuda_compiled"]:
        count, error = _C.cuda_device_count()  # must not crash without a driver: it reports instead
        assert isinstance(count, int) and (error is None or isinstance(error, str))
    else:
        assert not hasattr(_C, "cuda_device_count")


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_cast_matches_torch_and_cpu(src, dst, size):
    from pymerge.ops import native_cpu, native_cuda

    g = torch.Generator().manual_seed(size)
    x = (torch.randn(size, generator=g) * torch.exp2(torch.randint(-30, 31, (size,), generator=g).float())).to(src)
    got = native_cuda.cast(x.cuda(), dst).cpu()
    ref = x.to(dst)
    finite = ~torch.isnan(ref)
    assert torch.equal(_bits(got)[finite], _bits(ref)[finite])
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(_bits(got), _bits(native_cpu.cast(x, dst)))  # NaNs included: one shared header


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16])
def test_every_16bit_pattern(src):
    from pymerge.ops import native_cpu, native_cuda

    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src)
    for dst in DTYPES:
        assert torch.equal(_bits(native_cuda.cast(x.cuda(), dst).cpu()), _bits(native_cpu.cast(x, dst)))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_weighted_sum_bit_identical_to_cpu(in_dtype, out_dtype, size, normalize):
    from pymerge.ops import native_cpu, native_cuda

    g = torch.Generator().manual_seed(size + 17)
    k = 1 + size % 5
    xs = [torch.randn(size, generator=g).to(in_dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) + 0.1).tolist()
    got = native_cuda.weighted_sum([x.cuda() for x in xs], weights, normalize=normalize, out_dtype=out_dtype)
    want = native_cpu.weighted_sum(xs, weights, normalize=normalize, out_dtype=out_dtype)
    assert torch.equal(_bits(got.cpu()), _bits(want))


@pytest.mark.gpu
@needs_gpu
def test_runs_on_the_current_stream_and_checks_device():
    from pymerge.ops import native_cuda

    x = torch.randn(1 << 20, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = native_cuda.cast(x * 2, torch.bfloat16)  # x * 2 is enqueued on the same side stream
    stream.synchronize()
    assert torch.equal(y.cpu(), (x * 2).to(torch.bfloat16).cpu())
    with pytest.raises(ValueError, match="cuda tensor"):
        native_cuda.cast(torch.zeros(3), torch.float16)
    with pytest.raises(ValueError, match="at most"):
        native_cuda.weighted_sum([x] * 200, [1.0] * 200)
