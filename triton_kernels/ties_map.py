"""Triton TIES map: trim, elect, disjoint mean, scale, add base and round, in one pass over the inputs.

Kernel, then launcher, then the thin public function. Same contract and bits as the CPU kernel
(``pymerge/ops/native_cpu.ties_map``, formula in csrc/include/pymerge/cpu_kernels.h), per element i in fp32 with
every operation rounded separately (FMA fusion off):
    t_j = x_j - base;  keep_j = key(t_j) > T_j, or key(t_j) == T_j and i <= cutoff_j;  d_j = (t_j * keep_j) * w_j
    gamma = +1 if d_0 + d_1 + ... >= 0 else -1;  a_j = sgn(d_j) == gamma
    m = sum_j d_j a_j;  v = sum_j w_j a_j (0 -> 1);  r = m / v if normalize;  r = r * lambda;  out = base + r
Without consensus (task arithmetic on the trimmed vectors): m = d_0 + d_1 + ..., v = the fp32 weight sum
(|.| < 1e-8 -> 1).
Runs on GPU tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._args import Experts, check_dtype, f32_finite, per_expert, stack_experts, thresh_tensor
from ._common import magnitude_key, store_rounded

BLOCK_SIZE = 1024


@triton.jit
def _trimmed(x_ptr, x_stride, j, offs, mask, b, t_ptr, c_ptr, w_ptr):
    """d_j = (t_j * keep_j) * w_j for expert j of the tile ``offs``."""
    x = tl.load(x_ptr + j * x_stride + offs, mask=mask, other=0.0).to(tl.float32)  # upcast right after load
    t = x - b
    key = magnitude_key(t)
    thresh = tl.load(t_ptr + j)
    keep = (key > thresh) | ((key == thresh) & (offs <= tl.load(c_ptr + j)))
    return (t * keep.to(tl.float32)) * tl.load(w_ptr + j)


@triton.jit
def _agrees(s, d):
    """1.0 where sgn(d) equals the elected sign (+1 if s >= 0, else -1; NaN elects -1), else 0.0."""
    return tl.where(s >= 0.0, d > 0.0, d < 0.0).to(tl.float32)


@triton.jit(do_not_specialize=["x_stride"])  # a stride of 1 (n == 1) must stay a run-time int64-able value
def _ties_map_kernel(base_ptr, x_ptr, x_stride, w_ptr, t_ptr, c_ptr, out_ptr, n, lam, divisor,
                     K: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    stride = x_stride.to(tl.int64)  # k * n may exceed 2^31
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Election sum from its first term (a lone -0 stays -0, as in the torch twin).
    s = _trimmed(x_ptr, stride, 0, offs, mask, b, t_ptr, c_ptr, w_ptr)
    for j in tl.static_range(1, K):
        s = s + _trimmed(x_ptr, stride, j, offs, mask, b, t_ptr, c_ptr, w_ptr)
    if CONSENSUS:
        # Second sweep recomputes d_j (the tile's inputs are in cache) instead of holding K tiles in registers.
        d = _trimmed(x_ptr, stride, 0, offs, mask, b, t_ptr, c_ptr, w_ptr)
        a = _agrees(s, d)
        m = d * a
        v = tl.load(w_ptr) * a
        for j in tl.static_range(1, K):
            d = _trimmed(x_ptr, stride, j, offs, mask, b, t_ptr, c_ptr, w_ptr)
            a = _agrees(s, d)
            m = m + d * a
            v = v + tl.load(w_ptr + j) * a
        r = m
        if NORMALIZE:
            r = tl.math.div_rn(r, tl.where(v == 0.0, 1.0, v))  # IEEE division, not the approximate one
    else:
        r = s
        if NORMALIZE:
            r = tl.math.div_rn(r, divisor)
    if APPLY_LAMBDA:
        r = r * lam
    store_rounded(out_ptr + offs, b + r, mask)


def ties_map_launch(base: torch.Tensor, xs: torch.Tensor, weights: torch.Tensor, thresh: torch.Tensor,
                    cutoffs: torch.Tensor, lambda_: float, normalize: bool, out: torch.Tensor,
                    consensus: bool = True, divisor: float = 1.0) -> None:
    """Fills ``out`` (n elements) from ``base`` (n) and ``xs`` ([k, n], row stride xs.stride(0)). ``weights``
    (fp32), ``thresh`` (int32) and ``cutoffs`` (int64) hold k values on the inputs' device (unchecked);
    ``divisor`` (fp32 value) is used without consensus."""
    n = base.numel()
    if n == 0:
        return
    lam = float(torch.tensor(lambda_, dtype=torch.float32))
    _ties_map_kernel[(triton.cdiv(n, BLOCK_SIZE),)](
        base, xs, xs.stride(0), weights, thresh, cutoffs, out, n, lam, divisor,
        K=xs.shape[0], CONSENSUS=bool(consensus), NORMALIZE=bool(normalize), APPLY_LAMBDA=lam != 1.0, BLOCK=BLOCK_SIZE,
        enable_fp_fusion=False,  # keep every mul and add separately rounded, like the C++/CUDA kernels
    )


def ties_map(base: torch.Tensor, experts: Experts, weights: Sequence[float], thresh_keys: Sequence[int],
             tie_cutoffs: Sequence[int], *, lambda_: float = 1.0, normalize: bool = True, consensus: bool = True,
             out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = out_dtype(base + lambda * [normalized] disjoint mean of the sign-agreeing trimmed, weighted task
    vectors) (Triton; formula in the module docstring, bit-identical to ``native_cpu.ties_map``).

    ``experts``: a list of tensors like ``base``, or one contiguous [k, *base.shape] stack (used without a
    copy). ``thresh_keys`` in [-1, 2^31 - 1] and ``tie_cutoffs`` (flat indices into this call's elements;
    < 0 keeps no tie, >= n - 1 all) come from the radix histograms and the tie scan. ``out`` (optional) is a
    contiguous tensor of base's shape to write into; ``out_dtype`` defaults to base's dtype. ``consensus``
    False skips the sign election (task arithmetic on the trimmed vectors, as ``native_cpu.ties_map``).
    """
    xs = stack_experts(experts, base)
    k = xs.shape[0]
    w = f32_finite(per_expert(weights, k, "weights"), "weights")
    thresh = thresh_tensor(per_expert(thresh_keys, k, "thresh_keys"))
    cutoffs = torch.tensor([int(c) for c in per_expert(tie_cutoffs, k, "tie_cutoffs")], dtype=torch.int64)
    f32_finite([lambda_], "lambda_")
    if out is None:
        out_dtype = base.dtype if out_dtype is None else out_dtype
        check_dtype(out_dtype, "out_dtype")
        out = torch.empty(base.shape, dtype=out_dtype, device=base.device)
    elif out.shape != base.shape or not out.is_contiguous() or out.device != base.device:
        raise ValueError(f"out: expected a contiguous {tuple(base.shape)} tensor on {base.device}")
    else:
        check_dtype(out.dtype, "out")
    dev = base.device
    divisor = float(w[0])
    for j in range(1, k):  # fp32 adds in expert order, like the CPU kernel
        divisor = float(torch.tensor(divisor, dtype=torch.float32) + w[j])
    divisor = 1.0 if abs(divisor) < float(torch.tensor(1e-8, dtype=torch.float32)) else divisor
    ties_map_launch(base, xs, w.to(dev), thresh.to(dev), cutoffs.to(dev), lambda_, normalize, out,
                    consensus=consensus, divisor=divisor)
    return out
