"""Triton weighted sum: out[i] = out_dtype(sum_j w_j * float32(x_j[i]) [/ sum_j w_j]).

Kernel, then launcher, then the thin public function. Same formula, order and rounding as
``pymerge._C`` (``pymerge.ops.native_cpu.weighted_sum``): acc = w_0*x_0, then acc = acc + w_j*x_j
in input order, each mul and add rounded to fp32 (FMA fusion off), IEEE division by the weight sum
(float64 sum rounded to fp32), round to nearest even on output. Runs on GPU tensors, and on CPU tensors
under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

# Inputs summed per launch. More inputs take several launches through an fp32 accumulator, which gives
# the same bits (the running sum is an fp32 value either way).
MAX_INPUTS_PER_LAUNCH = 4
BLOCK_SIZE = 1024
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _to_bf16_rne(x):
    # Round fp32 -> bf16 to nearest even on the bits. The interpreter's own bf16 conversion truncates, so
    # both modes use this (on the GPU it is the same as cvt.rn). NaN keeps sign and top payload, quiet bit set.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _weighted_sum_kernel(
    acc_ptr,  # fp32 running sum of earlier launches (read when HAS_ACC)
    x0_ptr,
    x1_ptr,
    x2_ptr,
    x3_ptr,  # this launch's inputs; unused ones point at x0
    w_ptr,  # fp32 weights of this launch's inputs
    wsum_ptr,  # fp32 divisor (read when NORMALIZE)
    out_ptr,  # final output, or the fp32 accumulator when not FINAL
    n,
    NUM_X: tl.constexpr,
    HAS_ACC: tl.constexpr,
    FINAL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Upcast right after the load: all math is fp32.
    term = tl.load(w_ptr) * tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_ACC:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0) + term
    else:
        acc = term
    if NUM_X > 1:
        acc = acc + tl.load(w_ptr + 1) * tl.load(x1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_X > 2:
        acc = acc + tl.load(w_ptr + 2) * tl.load(x2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_X > 3:
        acc = acc + tl.load(w_ptr + 3) * tl.load(x3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if FINAL:
        if NORMALIZE:
            acc = tl.math.div_rn(acc, tl.load(wsum_ptr))  # IEEE division, not the fast approximate one
        if out_ptr.dtype.element_ty == tl.bfloat16:
            tl.store(out_ptr + offs, _to_bf16_rne(acc), mask=mask)
        else:
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + offs, acc, mask=mask)


def weighted_sum_launch(
    xs: Sequence[torch.Tensor], weights: torch.Tensor, weight_sum: torch.Tensor, out: torch.Tensor, normalize: bool
) -> None:
    """Fills ``out`` with the weighted sum. ``weights`` (len(xs),) and ``weight_sum`` (1,) are fp32 tensors
    on the inputs' device; all tensors contiguous, same numel (unchecked: see ``weighted_sum``)."""
    n = out.numel()
    if n == 0:
        return
    grid = (triton.cdiv(n, BLOCK_SIZE),)
    starts = list(range(0, len(xs), MAX_INPUTS_PER_LAUNCH))
    acc = out if len(starts) == 1 else torch.empty(n, dtype=torch.float32, device=out.device)
    for launch, start in enumerate(starts):
        group = list(xs[start : start + MAX_INPUTS_PER_LAUNCH])
        final = launch == len(starts) - 1
        padded = group + [group[0]] * (MAX_INPUTS_PER_LAUNCH - len(group))
        _weighted_sum_kernel[grid](
            acc,
            *padded,
            weights[start:],
            weight_sum,
            out if final else acc,
            n,
            NUM_X=len(group),
            HAS_ACC=launch > 0,
            FINAL=final,
            NORMALIZE=bool(normalize),
            BLOCK=BLOCK_SIZE,
            enable_fp_fusion=False,  # keep w*x and the add separately rounded, like the C++/CUDA kernels
        )


def weighted_sum(
    xs: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """out = out_dtype(sum_j w_j * float32(xs[j]) [/ sum_j w_j]), elementwise (Triton).

    ``xs``: non-empty, contiguous, one shape/dtype/device (float32, float16 or bfloat16); one finite weight
    per tensor; normalize needs a non-zero weight sum. ``out_dtype`` defaults to the inputs' dtype.
    """
    if isinstance(xs, torch.Tensor) or len(xs) == 0:
        raise ValueError("xs: expected a non-empty list of tensors")
    if len(weights) != len(xs):
        raise ValueError(f"weights: got {len(weights)} weights for {len(xs)} tensors (one weight per tensor)")
    first = xs[0]
    for j, x in enumerate(xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"xs[{j}]: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_contiguous():
            raise ValueError(f"xs[{j}]: expected a contiguous tensor (call .contiguous() first)")
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"xs[{j}]: {tuple(x.shape)} {x.dtype} on {x.device} differs from xs[0]: "
                f"{tuple(first.shape)} {first.dtype} on {first.device}"
            )
    out_dtype = first.dtype if out_dtype is None else out_dtype
    for what, dtype in (("xs", first.dtype), ("out_dtype", out_dtype)):
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{what}: dtype {dtype} is not supported (expected float32, float16 or bfloat16)")
    ws = [float(w) for w in weights]
    weights_f32 = torch.tensor(ws, dtype=torch.float32)  # rounds each weight to nearest fp32
    if not bool(torch.isfinite(weights_f32).all()):
        raise ValueError(f"weights: must be finite in float32, got {ws}")
    total = 0.0
    for w in ws:  # in order, in float64, like pymerge._C (Python 3.12's sum() compensates; this must not)
        total += w
    if normalize and (total == 0.0 or not torch.isfinite(torch.tensor(total, dtype=torch.float32))):
        raise ValueError(f"weights: normalize=True needs a non-zero finite weight sum, got {total}")
    out = torch.empty(first.shape, dtype=out_dtype, device=first.device)
    weight_sum = torch.tensor([total], dtype=torch.float32, device=first.device)
    weighted_sum_launch(list(xs), weights_f32.to(first.device), weight_sum, out, normalize)
    return out
