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
from pymerge.ops.native_cpu import (check_inputs, check_tensor, dare_map_args, dtype_code, per_expert)

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


# ---- Exact top-k, TIES, Philox masks, DARE/DELLA (same contracts as native_cpu; bit-identical results) ----

RADIX_BINS = 1 << 16
_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF


def _check_same(xs: Sequence[torch.Tensor], what: str, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference tensor (``like`` or ``xs[0]``), after checking every tensor is a contiguous CUDA tensor of
    its shape, dtype and device."""
    if isinstance(xs, torch.Tensor) or len(xs) == 0:
        raise ValueError(f"{what}: expected a non-empty list of tensors")
    ref_name = f"{what}[0]" if like is None else "base"
    first = check_tensor(xs[0] if like is None else like, ref_name, "cuda")
    dtype_code(first.dtype, what)
    for j, x in enumerate(xs):
        check_tensor(x, f"{what}[{j}]", "cuda")
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"{what}[{j}]: {tuple(x.shape)} {x.dtype} on {x.device} differs from {ref_name}: "
                             f"{tuple(first.shape)} {first.dtype} on {first.device}")
    return first


def _hist(xs: Sequence[torch.Tensor], base: Optional[torch.Tensor], hist: Optional[torch.Tensor],
          hi_bins: Sequence[int]) -> torch.Tensor:
    native = _require_cuda("the native CUDA radix histogram")
    first = _check_same(xs, "xs", base)
    device = first.device
    rows = len(xs)
    if hist is None:
        hist = torch.zeros(rows, RADIX_BINS, dtype=torch.int64, device=device)
    else:
        check_tensor(hist, "hist", "cuda")
        if hist.dtype != torch.int64 or tuple(hist.shape) != (rows, RADIX_BINS) or hist.device != device:
            raise ValueError(f"hist: expected an int64 tensor of shape ({rows}, {RADIX_BINS}) on {device}, "
                             f"got {hist.dtype} {tuple(hist.shape)} on {hist.device}")
    with torch.cuda.device(device):
        native.cuda_radix_hist([x.data_ptr() for x in xs], dtype_code(first.dtype, "xs"), first.numel(),
                               [int(b) for b in hi_bins], hist.data_ptr(), 0 if base is None else base.data_ptr(),
                               _stream_handle(device))
    return hist


def radix_hist_hi(xs: Sequence[torch.Tensor], *, base: Optional[torch.Tensor] = None,
                  hist: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hist[j, b] += #{i : key_j[i] >> 16 == b}, key_j = fp32 bits of |xs[j] - base| (|xs[j]| without base), on
    the GPU. As ``native_cpu.radix_hist_hi``; ``hist`` (int64 [len(xs), 65536], CUDA) is accumulated into."""
    return _hist(xs, base, hist, [])


def radix_hist_lo(xs: Sequence[torch.Tensor], hi_bins: Sequence[int], *, base: Optional[torch.Tensor] = None,
                  hist: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hist[j, key & 0xFFFF] += 1 for the keys of xs[j] with key >> 16 == hi_bins[j], on the GPU."""
    if len(hi_bins) != len(xs) or len(xs) == 0:
        raise ValueError(f"hi_bins: got {len(hi_bins)} bins for {len(xs)} tensors (one per tensor)")
    return _hist(xs, base, hist, hi_bins)


def tie_cutoffs(base: torch.Tensor, experts: Sequence[torch.Tensor], thresh_keys: Sequence[int],
                tie_budgets: Sequence[int]) -> tuple[list[int], list[int]]:
    """(cutoffs, budgets left) of ``native_cpu.tie_cutoffs`` for CUDA tensors. Synchronizes with the current
    stream (the results come back to the host); no kernel runs when no budget is positive."""
    _check_same(experts, "experts", base)
    k = len(experts)
    keys = [int(t) for t in per_expert(thresh_keys, k, "thresh_keys")]
    budgets = [int(b) for b in per_expert(tie_budgets, k, "tie_budgets")]
    n = base.numel()
    if all(b <= 0 for b in budgets) or n == 0:  # the contract without a scan
        return [n if b < 0 or (b > 0 and n == 0) else -1 for b in budgets], budgets
    native = _require_cuda("the native CUDA tie cutoffs")
    device = base.device
    with torch.cuda.device(device):
        nbytes = native.cuda_tie_cutoffs_scratch_bytes(n, k)
        scratch = torch.empty((nbytes + 7) // 8, dtype=torch.int64, device=device)
        cutoffs, left = native.cuda_tie_cutoffs(base.data_ptr(), [x.data_ptr() for x in experts],
                                                dtype_code(base.dtype, "base"), n, keys, budgets,
                                                scratch.data_ptr(), nbytes, _stream_handle(device))
    return list(cutoffs), list(left)


def ties_map(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float],
             thresh_keys: Sequence[int], tie_cutoffs: Sequence[int], *, lambda_: float = 1.0,
             normalize: bool = True, consensus: bool = True, out_dtype: Optional[torch.dtype] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused TIES map of ``native_cpu.ties_map`` (same formula, bit-identical) on CUDA tensors, enqueued on
    the current stream. ``out`` (optional): a contiguous CUDA tensor of base's shape to write into."""
    native = _require_cuda("the native CUDA TIES map")
    _check_same(experts, "experts", base)
    k = len(experts)
    ws = [float(w) for w in per_expert(weights, k, "weights")]
    keys = [int(t) for t in per_expert(thresh_keys, k, "thresh_keys")]
    cuts = [int(c) for c in per_expert(tie_cutoffs, k, "tie_cutoffs")]
    out = _out_like(base, out, out_dtype)
    with torch.cuda.device(base.device):
        native.cuda_ties_map(base.data_ptr(), [x.data_ptr() for x in experts], dtype_code(base.dtype, "base"),
                             base.numel(), ws, keys, cuts, float(lambda_), bool(normalize), out.data_ptr(),
                             dtype_code(out.dtype, "out"), bool(consensus), _stream_handle(base.device))
    return out


def _out_like(base: torch.Tensor, out: Optional[torch.Tensor], out_dtype: Optional[torch.dtype]) -> torch.Tensor:
    if out is None:
        with torch.cuda.device(base.device):
            return torch.empty(base.shape, dtype=base.dtype if out_dtype is None else out_dtype, device=base.device)
    check_tensor(out, "out", "cuda")
    if out.shape != base.shape or out.device != base.device:
        raise ValueError(f"out: expected a {tuple(base.shape)} tensor on {base.device}, "
                         f"got {tuple(out.shape)} on {out.device}")
    return out


def philox_uniform24(seed: int, model: int, tensor_name: str, start: int, count: int,
                     device: torch.device | str = "cuda") -> torch.Tensor:
    """u24[i] = word(seed, model, tensor_name, start + i) >> 8 as an int32 CUDA tensor (as native_cpu's)."""
    from .philox import name_hash

    native = _require_cuda("the native CUDA Philox generator")
    device = torch.device(device)
    with torch.cuda.device(device):
        out = torch.empty(int(count), dtype=torch.int32, device=device)
        native.cuda_philox_uniform24(int(seed) & _MASK64, int(model) & _MASK32, name_hash(tensor_name), int(start),
                                     int(count), out.data_ptr(), _stream_handle(out.device))
    return out


def philox_keep_mask(seed: int, model: int, tensor_name: str, start: int, count: int,
                     prob: float | torch.Tensor, device: torch.device | str = "cuda") -> torch.Tensor:
    """keep[i] = float(u24[i]) < fp32(p) * 2**24 for flat elements [start, start + count), a bool CUDA tensor.

    ``prob``: one float, or a contiguous fp32 CUDA tensor of ``count`` per-element probabilities (DELLA).
    Bit-identical to ``pymerge.ops.philox.keep_mask``.
    """
    from .philox import name_hash

    native = _require_cuda("the native CUDA Philox generator")
    probs_ptr, scalar = 0, 0.0
    if isinstance(prob, torch.Tensor):
        check_tensor(prob, "prob", "cuda")
        if prob.dtype != torch.float32 or prob.numel() != int(count):
            raise ValueError(f"prob: expected {count} float32 probabilities, got {prob.numel()} {prob.dtype}")
        probs_ptr, device = prob.data_ptr(), prob.device
    else:
        scalar = float(prob)
    device = torch.device(device)
    with torch.cuda.device(device):
        out = torch.empty(int(count), dtype=torch.bool, device=device)
        native.cuda_philox_keep_mask(int(seed) & _MASK64, int(model) & _MASK32, name_hash(tensor_name), int(start),
                                     int(count), scalar, probs_ptr, out.data_ptr(), _stream_handle(out.device))
    return out


def dare_map(base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float], *, seed: int,
             model_ids: Sequence[int], tensor_name: str, probs: Sequence[float] | Sequence[torch.Tensor],
             scales: Optional[Sequence[float]] = None, start: int = 0, consensus: Optional[str] = "sum",
             normalize: bool = False, lambda_: float = 1.0, out_dtype: Optional[torch.dtype] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DARE / DELLA map on CUDA tensors (formula in csrc/include/pymerge/cuda_kernels.h; the Triton twin is
    ``pymerge.triton_kernels.dare_map.dare_map``, same arguments; bit-identical to the torch methods).

    ``probs``: per expert a float keep probability (DARE) or a contiguous fp32 CUDA tensor of base's numel
    (DELLA's per-element probabilities). ``start``: flat index of base's first element in the whole tensor.
    ``consensus``: "sum", "count" or None. At most ``kMaxDareInputs`` (64) experts.
    """
    from .philox import name_hash

    native = _require_cuda("the native CUDA DARE map")
    _check_same(experts, "experts", base)
    a = dare_map_args(base, experts, weights, probs, scales, model_ids, consensus, "cuda")
    out = _out_like(base, out, out_dtype)
    with torch.cuda.device(base.device):
        native.cuda_dare_map(base.data_ptr(), [x.data_ptr() for x in experts], dtype_code(base.dtype, "base"),
                             base.numel(), a.weights, a.scales, a.probs, a.prob_ptrs, int(seed) & _MASK64,
                             a.model_ids, name_hash(tensor_name), int(start), a.consensus, bool(normalize),
                             a.divisor, float(lambda_), out.data_ptr(), dtype_code(out.dtype, "out"),
                             _stream_handle(base.device))
    return out
