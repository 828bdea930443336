"""pymerge._C's own argument checks (the layer below the torch wrappers): every precondition a kernel
relies on must be refused with a ValueError naming the argument, before any memory is touched."""

from __future__ import annotations

import threading

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

F32, F16, BF16 = 0, 1, 2


def test_dtype_codes_are_stable():
    assert (_C.DTYPE_F32, _C.DTYPE_F16, _C.DTYPE_BF16) == (F32, F16, BF16)
    assert _C.build_info()["dtype_codes"] == {"float32": 0, "float16": 1, "bfloat16": 2}


def test_build_info_describes_the_build():
    info = _C.build_info()
    assert isinstance(info["openmp"], bool) and info["omp_max_threads"] >= 1
    assert isinstance(info["compiler"], str) and info["compiler"]
    assert info["cuda_compiled"] == hasattr(_C, "cuda_cast") == hasattr(_C, "cuda_weighted_sum")
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and info["cuda_version"] and info["cuda_max_inputs"] >= 8
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None


def test_cast_rejects_bad_arguments():
    x, y = torch.zeros(8), torch.zeros(8, dtype=torch.float16)
    with pytest.raises(ValueError, match="src_ptr: null pointer"):
        _C.cast(0, F32, y.data_ptr(), F16, 8)
    with pytest.raises(ValueError, match="dst_ptr: null pointer"):
        _C.cast(x.data_ptr(), F32, 0, F16, 8)
    with pytest.raises(ValueError, match="src_dtype: unknown dtype code 3"):
        _C.cast(x.data_ptr(), 3, y.data_ptr(), F16, 8)
    with pytest.raises(ValueError, match="dst_dtype: unknown dtype code -1"):
        _C.cast(x.data_ptr(), F32, y.data_ptr(), -1, 8)
    with pytest.raises(ValueError, match="n: element count must be >= 0"):
        _C.cast(x.data_ptr(), F32, y.data_ptr(), F16, -1)
    with pytest.raises(ValueError, match="address must be >= 0"):
        _C.cast(-16, F32, y.data_ptr(), F16, 8)
    with pytest.raises(ValueError, match="too large"):
        _C.cast(x.data_ptr(), F32, y.data_ptr(), F16, 2**62)
    # Writing float16 over the tail of its own float32 source would corrupt unread inputs.
    with pytest.raises(ValueError, match="overlap"):
        _C.cast(x.data_ptr(), F32, x.data_ptr() + 8, F16, 8)
    _C.cast(0, F32, 0, F16, 0)  # nothing to do: null pointers are fine with n = 0
    _C.cast(x.data_ptr(), F32, x.data_ptr(), F32, 8)  # an exact self-copy is harmless


def test_weighted_sum_rejects_bad_arguments():
    a, b, out = torch.ones(4), torch.ones(4), torch.zeros(4)
    ptrs = [a.data_ptr(), b.data_ptr()]
    with pytest.raises(ValueError, match="at least one input"):
        _C.weighted_sum([], F32, [], out.data_ptr(), F32, 4, False)
    with pytest.raises(ValueError, match="got 1 weights for 2 inputs"):
        _C.weighted_sum(ptrs, F32, [1.0], out.data_ptr(), F32, 4, False)
    with pytest.raises(ValueError, match=r"input_ptrs\[1\]: null pointer"):
        _C.weighted_sum([a.data_ptr(), 0], F32, [1.0, 1.0], out.data_ptr(), F32, 4, False)
    with pytest.raises(ValueError, match="out_ptr: null pointer"):
        _C.weighted_sum(ptrs, F32, [1.0, 1.0], 0, F32, 4, False)
    with pytest.raises(ValueError, match="in_dtype: unknown dtype code 7"):
        _C.weighted_sum(ptrs, 7, [1.0, 1.0], out.data_ptr(), F32, 4, False)
    with pytest.raises(ValueError, match="out_dtype: unknown dtype code 9"):
        _C.weighted_sum(ptrs, F32, [1.0, 1.0], out.data_ptr(), 9, 4, False)
    with pytest.raises(ValueError, match="n: element count"):
        _C.weighted_sum(ptrs, F32, [1.0, 1.0], out.data_ptr(), F32, -4, False)
    with pytest.raises(ValueError, match="non-zero finite weight sum"):
        _C.weighted_sum(ptrs, F32, [2.0, -2.0], out.data_ptr(), F32, 4, True)
    with pytest.raises(ValueError, match=r"weights\[0\]: must be finite"):
        _C.weighted_sum(ptrs, F32, [float("inf"), 1.0], out.data_ptr(), F32, 4, False)
    with pytest.raises(ValueError, match=r"input_ptrs\[1\]: overlaps the output"):
        _C.weighted_sum(ptrs, F32, [1.0, 1.0], b.data_ptr() + 4, F32, 4, False)
    assert torch.equal(out, torch.zeros(4))  # nothing was written by a refused call


def test_weighted_sum_in_place_on_an_input():
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    _C.weighted_sum([a.data_ptr(), b.data_ptr()], F32, [2.0, 0.5], a.data_ptr(), F32, 3, False)
    assert a.tolist() == [7.0, 14.0, 21.0]


def test_concurrent_calls_from_threads():
    # The GIL is released around the kernels: calls from several threads must not interfere.
    x = torch.randn(300_001)
    want = x.to(torch.bfloat16)
    outs = [torch.empty_like(want) for _ in range(4)]

    def work(out):
        for _ in range(5):
            _C.cast(x.data_ptr(), F32, out.data_ptr(), BF16, x.numel())

    threads = [threading.Thread(target=work, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
