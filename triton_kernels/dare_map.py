"""Triton DARE / DELLA map: Philox keep masks, rescale, weights, optional sign consensus, base, in one pass.

Kernel, then launcher, then the thin public function. The keep mask is bit-identical to
``pymerge.ops.philox.keep_mask`` (element e of expert j draws word e of the stream (seed, model_ids[j],
name_hash(tensor name)); keep iff float(word >> 8) < fp32(p) * 2^24). Per element i of this call (flat element
start + i of the tensor), fp32 with every operation rounded separately (FMA fusion off):
    t_j = x_j - base;  d_j = ((t_j * keep_j) * scale_j) * w_j
    consensus "sum":   gamma = +1 if d_0 + d_1 + ... >= 0 else -1;   "count": the same on sgn(d_0) + sgn(d_1) + ...
                       a_j = sgn(d_j) == gamma;  m = sum_j d_j a_j;  v = sum_j w_j a_j (0 -> 1)
    no consensus:      m = sum_j d_j;  v = divisor (the fp32 weight sum, |.| < 1e-8 -> 1, from the host)
    r = m / v if normalize;  r = r * lambda;  out = base + r, rounded to nearest even
(sums in expert order from their first term). This is ``pymerge.methods.task_arithmetic`` with the ``random``
(DARE) or ``della_magprune`` (DELLA: per-element keep probabilities) sparsifier: dare_linear, dare_ties,
della, della_linear. Runs on GPU tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl

from ._args import Experts, check_contiguous, check_dtype, f32_finite, per_expert, stack_experts
from ._common import philox_tile, store_rounded, uniform24

BLOCK_SIZE = 1024  # elements per program: 256 Philox blocks of 4 words
CONSENSUS_CODES = {None: 0, "sum": 1, "count": 2}
_MASK32 = 0xFFFFFFFF


@triton.jit
def _delta(j, x_ptr, x_stride, i, mask, b, w_ptr, scale_ptr, lim_ptr, p_ptr, p_stride, model_ptr,
           c0, c1, c3, lane, k0, k1, PER_ELEMENT: tl.constexpr):
    """d_j = ((t_j * keep_j) * scale_j) * w_j on a [rows, 4] tile (row = one Philox block, column = its lane)."""
    x = tl.load(x_ptr + j * x_stride + i, mask=mask, other=0.0).to(tl.float32)  # upcast right after load
    t = x - b
    c2 = tl.full(c0.shape, 0, tl.uint32) + tl.load(model_ptr + j).to(tl.uint32)
    u = uniform24(c0, c1, c2, c3, k0, k1, lane)
    if PER_ELEMENT:
        limit = tl.load(p_ptr + j * p_stride + i, mask=mask, other=0.0) * 16777216.0  # exact: times 2^24
    else:
        limit = tl.load(lim_ptr + j)
    keep = (u < limit).to(tl.float32)
    return ((t * keep) * tl.load(scale_ptr + j)) * tl.load(w_ptr + j)


@triton.jit
def _sgn(d):
    """torch.sign: +1, -1, or 0 for zeros and NaN."""
    return (d > 0.0).to(tl.float32) - (d < 0.0).to(tl.float32)


@triton.jit(do_not_specialize=["x_stride", "p_stride", "phase", "block0", "key0", "key1", "name_hash"])
def _dare_map_kernel(base_ptr, x_ptr, x_stride, w_ptr, scale_ptr, lim_ptr, p_ptr, p_stride, model_ptr, out_ptr,
                     n, phase, block0, key0, key1, name_hash, divisor, lam,
                     K: tl.constexpr, CONSENSUS: tl.constexpr, NORMALIZE: tl.constexpr,
                     APPLY_LAMBDA: tl.constexpr, PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr):
    # The tile is aligned to Philox blocks of the tensor's flat index (start + i), so one Philox call gives the
    # four words of one row (philox_tile).
    i, mask, c0, c1, c3, lane = philox_tile(tl.program_id(0), phase, block0, n, name_hash, BLOCK)
    k0 = key0.to(tl.uint32)
    k1 = key1.to(tl.uint32)
    xs = x_stride.to(tl.int64)
    ps = p_stride.to(tl.int64)
    b = tl.load(base_ptr + i, mask=mask, other=0.0).to(tl.float32)

    d = _delta(0, x_ptr, xs, i, mask, b, w_ptr, scale_ptr, lim_ptr, p_ptr, ps, model_ptr, c0, c1, c3, lane, k0,
               k1, PER_ELEMENT)
    if CONSENSUS == 0:
        m = d
        for j in tl.static_range(1, K):
            m = m + _delta(j, x_ptr, xs, i, mask, b, w_ptr, scale_ptr, lim_ptr, p_ptr, ps, model_ptr, c0, c1, c3,
                           lane, k0, k1, PER_ELEMENT)
        v = divisor
    else:
        s = d if CONSENSUS == 1 else _sgn(d)
        for j in tl.static_range(1, K):
            dj = _delta(j, x_ptr, xs, i, mask, b, w_ptr, scale_ptr, lim_ptr, p_ptr, ps, model_ptr, c0, c1, c3,
                        lane, k0, k1, PER_ELEMENT)
            s = s + (dj if CONSENSUS == 1 else _sgn(dj))
        positive = s >= 0.0  # NaN elects -1
        a = tl.where(positive, d > 0.0, d < 0.0).to(tl.float32)
        m = d * a
        v = tl.load(w_ptr) * a
        # Recompute d_j (inputs in cache, Philox in registers) rather than hold K tiles.
        for j in tl.static_range(1, K):
            dj = _delta(j, x_ptr, xs, i, mask, b, w_ptr, scale_ptr, lim_ptr, p_ptr, ps, model_ptr, c0, c1, c3,
                        lane, k0, k1, PER_ELEMENT)
            a = tl.where(positive, dj > 0.0, dj < 0.0).to(tl.float32)
            m = m + dj * a
            v = v + tl.load(w_ptr + j) * a
        v = tl.where(v == 0.0, 1.0, v)
    r = m
    if NORMALIZE:
        r = tl.math.div_rn(r, v)  # IEEE division
    if APPLY_LAMBDA:
        r = r * lam
    store_rounded(out_ptr + i, b + r, mask)


def _f32(x: float) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


def linear_divisor(weights: Sequence[float]) -> float:
    """The no-consensus divisor of the torch twin: fp32 weights summed in order in fp32, |.| < 1e-8 -> 1."""
    acc = torch.tensor(float(weights[0]), dtype=torch.float32)
    for w in weights[1:]:
        acc = acc + torch.tensor(float(w), dtype=torch.float32)
    return 1.0 if bool(acc.abs() < 1e-8) else float(acc)  # compared in fp32, as the twin does


def dare_map_launch(base: torch.Tensor, xs: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor,
                    limits: torch.Tensor, probs: Optional[torch.Tensor], model_ids: torch.Tensor, out: torch.Tensor,
                    *, seed: int, name_hash: int, start: int, consensus: Optional[str], normalize: bool,
                    lambda_: float, divisor: float) -> None:
    """Fills ``out`` (n elements). ``xs`` [k, n] (row stride xs.stride(0)); fp32 ``weights``, ``scales``,
    ``limits`` (fp32(p_j) * 2^24) and int64 ``model_ids`` hold k values on the device; ``probs`` (fp32
    [k, n], row stride probs.stride(0)) replaces ``limits`` when given. Unchecked (see ``dare_map``)."""
    n = base.numel()
    if n == 0:
        return
    lam = _f32(lambda_)
    seed &= (1 << 64) - 1
    phase = start % 4
    _dare_map_kernel[(triton.cdiv(n + phase, BLOCK_SIZE),)](
        base, xs, xs.stride(0), weights, scales, limits, weights if probs is None else probs,
        0 if probs is None else probs.stride(0), model_ids, out, n, phase, start // 4, seed & _MASK32,
        seed >> 32, name_hash & _MASK32, _f32(divisor), lam,
        K=xs.shape[0], CONSENSUS=CONSENSUS_CODES[consensus], NORMALIZE=bool(normalize), APPLY_LAMBDA=lam != 1.0,
        PER_ELEMENT=probs is not None, BLOCK=BLOCK_SIZE,
        enable_fp_fusion=False,  # keep every mul and add separately rounded, like the C++/CUDA kernels
    )


def dare_map(base: torch.Tensor, experts: Experts, weights: Sequence[float], *, seed: int,
             model_ids: Sequence[int], tensor_name: str, probs: Union[Sequence[float], torch.Tensor],
             scales: Optional[Sequence[float]] = None, start: int = 0, consensus: Optional[str] = "sum",
             normalize: bool = False, lambda_: float = 1.0, out_dtype: Optional[torch.dtype] = None,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = out_dtype(base + lambda * [normalized] merge of the Philox-masked, rescaled, weighted task vectors)
    (Triton; formula in the module docstring).

    ``experts``: tensors like ``base``, or one contiguous [k, *base.shape] stack. ``probs``: one keep
    probability per expert (DARE: the density; >= 1 keeps all), or a contiguous fp32 [k, *base.shape] tensor of
    per-element probabilities (DELLA). ``scales``: per-expert rescale factors (default 1). ``start``: flat
    index of base's first element in the whole tensor (the Philox counter). ``consensus``: "sum", "count" or
    None (no sign election; the divisor is the weight sum).
    """
    from pymerge.ops.philox import name_hash

    xs = stack_experts(experts, base)
    k = xs.shape[0]
    w = f32_finite(per_expert(weights, k, "weights"), "weights")
    sc = f32_finite(per_expert([1.0] * k if scales is None else scales, k, "scales"), "scales")
    ids = [int(m) for m in per_expert(model_ids, k, "model_ids")]
    if consensus not in CONSENSUS_CODES:
        raise ValueError(f"consensus: expected 'sum', 'count' or None, got {consensus!r}")
    if int(start) < 0:
        raise ValueError(f"start: must be >= 0, got {start}")
    f32_finite([lambda_], "lambda_")
    dev = base.device
    if isinstance(probs, torch.Tensor):
        check_contiguous(probs, "probs")
        if probs.dtype != torch.float32 or probs.numel() != k * base.numel() or probs.device != dev:
            raise ValueError(f"probs: expected a float32 [{k}, {base.numel()}] tensor on {dev}, "
                             f"got {probs.dtype} {tuple(probs.shape)} on {probs.device}")
        p_tensor = probs.reshape(k, -1)
        limits = torch.zeros(k, dtype=torch.float32)
    else:
        p_tensor = None
        ps = [float(p) for p in per_expert(probs, k, "probs")]
        if any(p != p for p in ps):
            raise ValueError(f"probs: must be probabilities, got {ps}")
        limits = torch.tensor(ps, dtype=torch.float32) * float(1 << 24)  # fp32(p) * 2^24, as philox.keep_mask
    if out is None:
        out_dtype = base.dtype if out_dtype is None else out_dtype
        check_dtype(out_dtype, "out_dtype")
        out = torch.empty(base.shape, dtype=out_dtype, device=dev)
    elif out.shape != base.shape or not out.is_contiguous() or out.device != dev:
        raise ValueError(f"out: expected a contiguous {tuple(base.shape)} tensor on {dev}")
    else:
        check_dtype(out.dtype, "out")
    dare_map_launch(base, xs, w.to(dev), sc.to(dev), limits.to(dev), p_tensor,
                    torch.tensor([m & _MASK32 for m in ids], dtype=torch.int64, device=dev), out,
                    seed=int(seed), name_hash=name_hash(tensor_name), start=int(start), consensus=consensus,
                    normalize=normalize, lambda_=lambda_, divisor=linear_divisor(weights))
    return out
