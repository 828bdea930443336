"""Torch-facing wrappers of the C++ CPU kernels in ``pymerge._C`` (CPU tensors only).

Each wrapper checks what the kernel cannot see (device, contiguity, shapes, dtypes), allocates the
output and passes ``data_ptr()``s, element counts and dtype codes to ``pymerge._C``. Bad arguments
raise ValueError/TypeError (programming errors); a missing extension raises
``pymerge.errors.BackendUnavailable``. The argument checks here are shared with ``native_cuda``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from pymerge._native import require_native

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
    native = require_native("the native CPU cast")
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
    native = require_native("the native CPU weighted_sum")
    ws = check_inputs(xs, weights, "cpu")
    in_code = dtype_code(xs[0].dtype, "xs")
    out_dtype = xs[0].dtype if out_dtype is None else out_dtype
    out_code = dtype_code(out_dtype, "out_dtype")
    out = torch.empty(xs[0].shape, dtype=out_dtype, device=xs[0].device)
    native.weighted_sum(
        [x.data_ptr() for x in xs], in_code, ws, out.data_ptr(), out_code, out.numel(), bool(normalize)
    )
    return out
