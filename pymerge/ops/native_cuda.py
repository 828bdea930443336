"""Torch-facing wrappers of the CUDA kernels in ``pymerge._C`` (CUDA tensors only).

Same checks and formulas as ``native_cpu`` (the results are bit-identical). Kernels are enqueued on
torch's current stream of the tensors' device, so they order with surrounding torch work and the output
needs no synchronization. ``BackendUnavailable`` is raised when the extension has no CUDA kernels
(built without nvcc or with PYMERGE_NO_CUDA=1), when torch sees no GPU, or when the CUDA runtime built
into the extension cannot use the driver (e.g. a driver older than the toolkit).
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Optional, Sequence

import torch

from pymerge._native import native_module, native_unavailable_reason, require_native
from pymerge.errors import BackendUnavailable
from pymerge.ops.native_cpu import check_inputs, check_tensor, dtype_code

_runtime_lock = threading.Lock()
_runtime_error: Optional[str] = None
_runtime_checked = False


def cuda_unavailable_reason() -> Optional[str]:
    """Why the native CUDA kernels cannot run here, or None when they can."""
    global _runtime_checked, _runtime_error
    native = native_module()
    if native is None:
        return f"pymerge._C is not available ({native_unavailable_reason()})"
    if not hasattr(native, "cuda_cast"):
        return "pymerge._C was built without CUDA kernels (no nvcc at build time, or PYMERGE_NO_CUDA=1)"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    with _runtime_lock:  # ask the extension's own CUDA runtime once: it may differ from torch's
        if not _runtime_checked:
            count, error = native.cuda_device_count()
            if error is None and count == 0:
                error = "no CUDA device"
            _runtime_error = None if error is None else f"the CUDA runtime in pymerge._C reports: {error}"
            _runtime_checked = True
    return _runtime_error


def _require_cuda(feature: str) -> ModuleType:
    native = require_native(feature)
    reason = cuda_unavailable_reason()
    if reason is not None:
        raise BackendUnavailable(f"{feature} is unavailable: {reason}")
    return native


def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[i] = dtype(x[i]): float32/float16/bfloat16 both ways, round to nearest even, on the GPU.

    Bit-exact with ``x.to(dtype)`` for every non-NaN value, and with ``native_cpu.cast``. ``x`` must be a
    contiguous CUDA tensor. Returns a new tensor of x's shape on x's device.
    """
    native = _require_cuda("the native CUDA cast")
    check_tensor(x, "x", "cuda")
    src_code = dtype_code(x.dtype, "x")
    dst_code = dtype_code(dtype, "dtype")
    with torch.cuda.device(x.device):
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        native.cuda_cast(x.data_ptr(), src_code, out.data_ptr(), dst_code, x.numel(), _stream_handle(x.device))
    return out


def weighted_sum(
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """out = out_dtype(sum_j w_j * float32(xs[j]) [/ sum_j w_j]), elementwise, on the GPU.

    The same fp32 formula, order and rounding as ``native_cpu.weighted_sum`` (bit-identical results).
    ``xs`` are contiguous CUDA tensors of one shape, dtype and device (at most
    ``pymerge._C.build_info()["cuda_max_inputs"]`` of them); ``out_dtype`` defaults to theirs.
    """
    native = _require_cuda("the native CUDA weighted_sum")
    ws = check_inputs(xs, weights, "cuda")
    in_code = dtype_code(xs[0].dtype, "xs")
    out_dtype = xs[0].dtype if out_dtype is None else out_dtype
    out_code = dtype_code(out_dtype, "out_dtype")
    device = xs[0].device
    with torch.cuda.device(device):
        out = torch.empty(xs[0].shape, dtype=out_dtype, device=device)
        native.cuda_weighted_sum(
            [x.data_ptr() for x in xs],
            in_code,
            ws,
            out.data_ptr(),
            out_code,
            out.numel(),
            bool(normalize),
            _stream_handle(device),
        )
    return out
