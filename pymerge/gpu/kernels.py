"""The fused per-chunk kernels the GPU merges call, behind one interface, for three backends:

``cuda``   pymerge._C's CUDA kernels (pymerge.ops.native_cuda)
``triton`` pymerge.triton_kernels (GPU, or the interpreter on CPU tensors)
``torch``  the torch twins below: the same formulas in plain torch ops, on any device (CPU in the tests)

Every function takes a flat base ``[n]`` and the experts as one contiguous stack ``[k, n]`` (the executor's
device buffer layout); results are bit-identical across the backends (the CUDA/Triton tests check it).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import BackendUnavailable
from ..ops.exact_sum import lane_row_sums, row_sums
from ..ops.philox import keep_mask as torch_keep_mask
from ..ops.select import magnitude_keys

BINS = 1 << 16


class TorchKernels:
    """The torch twins of the fused kernels (formulas in csrc/include/pymerge/{cpu,cuda}_kernels.h).

    A checking tool: their temporaries (whole-chunk fp32 copies, int64 Philox words) are not counted in the
    GPU budget, except the tie scan's, which the Triton set shares.
    """

    name = "torch"

    def ties_scratch(self, k: int, numel: int) -> tuple[float, int]:
        """(device bytes per chunk element, fixed bytes) that the TIES reduce and map passes need beyond the
        chunk buffers and the int64 histograms."""
        return float(self.TIE_SCAN_BYTES_PER_ELEMENT), 0

    @staticmethod
    def _keys(xs: torch.Tensor, base: Optional[torch.Tensor]) -> torch.Tensor:
        return magnitude_keys(xs.float() - base.float() if base is not None else xs.float()).long()

    def radix_hist_hi(self, xs, base, hist):
        for j, keys in enumerate(self._keys(xs, base)):
            hist[j] += torch.bincount(keys >> 16, minlength=BINS)
        return hist

    def radix_hist_lo(self, xs, hi_bins, base, hist):
        for j, keys in enumerate(self._keys(xs, base)):
            hist[j] += torch.bincount(keys[(keys >> 16) == int(hi_bins[j])] & 0xFFFF, minlength=BINS)
        return hist

    # Device bytes per chunk element of the tie scan below: base and one expert widened, their difference, its
    # keys, the equality mask, and at most one int64 index per element.
    TIE_SCAN_BYTES_PER_ELEMENT = 4 + 4 + 4 + 4 + 1 + 8

    def tie_cutoffs(self, base, xs, thresh_keys, tie_budgets):
        n = base.numel()
        cutoffs, left = [], []
        b = base.float()
        for j, budget in enumerate(tie_budgets):
            if budget < 0:
                cutoffs.append(n), left.append(budget)
            elif budget == 0:
                cutoffs.append(-1), left.append(0)
            else:  # one expert at a time: the scratch is TIE_SCAN_BYTES_PER_ELEMENT, whatever k is
                ties = torch.nonzero(magnitude_keys(xs[j].float() - b) == int(thresh_keys[j])).reshape(-1)
                if budget <= ties.numel():
                    cutoffs.append(int(ties[budget - 1])), left.append(0)
                else:
                    cutoffs.append(n), left.append(budget - ties.numel())
        return cutoffs, left

    @staticmethod
    def _finish(b, m, v, normalize, lambda_, out):
        r = m / v if normalize else m
        lam = torch.tensor(lambda_, dtype=torch.float32)
        if float(lam) != 1.0:
            r = r * lam.to(r.device)
        out.copy_(b + r)  # copy_ narrows with round to nearest even
        return out

    @staticmethod
    def _elect(ds, ws, signs_only):
        s = None
        for d in ds:
            t = torch.sign(d) if signs_only else d
            s = t if s is None else s + t
        positive = s >= 0
        m = v = None
        for d, w in zip(ds, ws):
            a = torch.where(positive, d > 0, d < 0).float()
            m = d * a if m is None else m + d * a
            v = w * a if v is None else v + w * a
        return m, torch.where(v == 0, torch.ones_like(v), v)

    @staticmethod
    def _linear_divisor(ws):
        acc = ws[0]
        for w in ws[1:]:
            acc = acc + w
        return torch.where(acc.abs() < 1e-8, torch.ones_like(acc), acc)

    def ties_map(self, base, xs, weights, thresh_keys, cutoffs, lambda_, normalize, consensus, out):
        b = base.float()
        i = torch.arange(b.numel(), device=b.device)
        ws = [torch.tensor(float(w), dtype=torch.float32, device=b.device) for w in weights]
        ds = []
        for j in range(xs.shape[0]):
            t = xs[j].float() - b
            keys = magnitude_keys(t)
            keep = (keys > thresh_keys[j]) | ((keys == thresh_keys[j]) & (i <= cutoffs[j]))
            ds.append((t * keep.float()) * ws[j])
        if consensus:
            m, v = self._elect(ds, ws, False)
        else:
            m = ds[0]
            for d in ds[1:]:
                m = m + d
            v = self._linear_divisor(ws)
        return self._finish(b, m, v, normalize, lambda_, out)

    def keep_mask(self, seed, model, name, start, count, prob, device):
        return torch_keep_mask(seed, model, name, start, count, prob, device=device)

    def l1_rows(self, base, x, *, seed, model, tensor_name, start, prob):
        """[rows, 2] fp64 (sum |x - base|, sum |x - base| * keep) per row, in lane_row_sums' order (the CPU
        backend's); the sums are taken on the host, where cumsum adds in index order."""
        keep = self.keep_mask(seed, model, tensor_name, start, base.numel(), prob, base.device)
        return _lane_l1(base, x, keep)

    def dare_map(self, base, xs, weights, *, seed, model_ids, tensor_name, probs, scales, start, consensus,
                 normalize, lambda_, out):
        b = base.float()
        dev = b.device
        ws = [torch.tensor(float(w), dtype=torch.float32, device=dev) for w in weights]
        ds = []
        for j in range(xs.shape[0]):
            t = xs[j].float() - b
            keep = torch_keep_mask(seed, model_ids[j], tensor_name, start, b.numel(), probs[j], device=dev)
            sc = torch.tensor(float(scales[j]), dtype=torch.float32, device=dev)
            ds.append(((t * keep.float()) * sc) * ws[j])
        if consensus is not None:
            m, v = self._elect(ds, ws, consensus == "count")
        else:
            m = ds[0]
            for d in ds[1:]:
                m = m + d
            v = self._linear_divisor(ws)
        return self._finish(b, m, v, normalize, lambda_, out)


class CudaKernels:
    """pymerge._C's CUDA kernels (experts passed as the stack's row views: no copy)."""

    name = "cuda"

    def __init__(self):
        from ..ops import native_cuda

        reason = native_cuda.cuda_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"backend 'cuda' is not available: {reason}")
        self.nc = native_cuda
        self._triton_l1 = None  # the Triton L1 kernel module, False when Triton is missing (l1_rows)

    def ties_scratch(self, k: int, numel: int) -> tuple[float, int]:
        """The tie scan's scratch (native_cuda.tie_cutoffs): one int64 count per 8192-element segment and
        expert, two int64 results per expert, and the allocator's 512-byte rounding."""
        return 8.0 * k / 8192, 8 * (k + 2 * k) + 512

    def radix_hist_hi(self, xs, base, hist):
        return self.nc.radix_hist_hi(list(xs), base=base, hist=hist)

    def radix_hist_lo(self, xs, hi_bins, base, hist):
        return self.nc.radix_hist_lo(list(xs), hi_bins, base=base, hist=hist)

    def tie_cutoffs(self, base, xs, thresh_keys, tie_budgets):
        return self.nc.tie_cutoffs(base, list(xs), thresh_keys, tie_budgets)

    def ties_map(self, base, xs, weights, thresh_keys, cutoffs, lambda_, normalize, consensus, out):
        return self.nc.ties_map(base, list(xs), weights, thresh_keys, cutoffs, lambda_=lambda_,
                                normalize=normalize, consensus=consensus, out=out)

    def keep_mask(self, seed, model, name, start, count, prob, device):
        return self.nc.philox_keep_mask(seed, model, name, start, count, prob, device=device)

    def l1_rows(self, base, x, *, seed, model, tensor_name, start, prob):
        """The L1 row sums in the CPU backend's order: the Triton kernel where Triton is installed (there is no
        CUDA C++ one yet), else torch sums on the device, whose order differs (a last-bit difference in a DARE/
        DELLA rescale factor, now and then)."""
        if self._triton_l1 is None:
            from ..triton_kernels import triton_unavailable_reason

            self._triton_l1 = False
            if triton_unavailable_reason() is None:
                from ..triton_kernels import l1_rows as triton_l1

                self._triton_l1 = triton_l1
        if self._triton_l1:
            return self._triton_l1.l1_rows(base, x, seed=seed, model=model, tensor_name=tensor_name, start=start,
                                           prob=prob)
        keep = self.keep_mask(seed, model, tensor_name, start, base.numel(), prob, base.device)
        a = (x.float() - base.float()).abs()
        return torch.stack([row_sums(a), row_sums(a * keep.reshape(a.shape))], dim=1)

    def dare_map(self, base, xs, weights, *, probs, **kw):
        return self.nc.dare_map(base, list(xs), weights, probs=probs, **kw)


class TritonKernels:
    """pymerge.triton_kernels (the tie scan, which has no Triton kernel, uses the torch twin)."""

    name = "triton"

    def __init__(self):
        from ..triton_kernels import triton_unavailable_reason

        reason = triton_unavailable_reason()
        if reason is not None:
            raise BackendUnavailable(f"backend 'triton' is not available: {reason}")
        from ..triton_kernels import dare_map, keep_mask, l1_rows, radix_hist, ties_map

        self.dm, self.km, self.l1, self.rh, self.tm = dare_map, keep_mask, l1_rows, radix_hist, ties_map
        self.twin = TorchKernels()

    def ties_scratch(self, k: int, numel: int) -> tuple[float, int]:
        """The tie scan's (the torch twin's) per element; fixed: the histograms' int32 scratch copies, their
        int32 sum and its widening into the int64 histogram."""
        copies = min(self.rh.REPLICAS, -(-max(numel, 1) // self.rh.BLOCK_SIZE))
        return float(TorchKernels.TIE_SCAN_BYTES_PER_ELEMENT), k * BINS * (copies * 4 + 4 + 8)

    def radix_hist_hi(self, xs, base, hist):
        return self.rh.radix_hist_hi(xs, base=base, hist=hist)

    def radix_hist_lo(self, xs, hi_bins, base, hist):
        return self.rh.radix_hist_lo(xs, hi_bins, base=base, hist=hist)

    def tie_cutoffs(self, base, xs, thresh_keys, tie_budgets):
        return self.twin.tie_cutoffs(base, xs, thresh_keys, tie_budgets)

    def ties_map(self, base, xs, weights, thresh_keys, cutoffs, lambda_, normalize, consensus, out):
        return self.tm.ties_map(base, xs, weights, thresh_keys, cutoffs, lambda_=lambda_, normalize=normalize,
                                consensus=consensus, out=out)

    def keep_mask(self, seed, model, name, start, count, prob, device):
        return self.km.keep_mask(seed, model, name, start, count, prob, device=device)

    def l1_rows(self, base, x, *, seed, model, tensor_name, start, prob):
        return self.l1.l1_rows(base, x, seed=seed, model=model, tensor_name=tensor_name, start=start, prob=prob)

    def dare_map(self, base, xs, weights, *, probs, **kw):
        if any(isinstance(p, torch.Tensor) for p in probs):  # the Triton kernel takes one [k, n] stack
            probs = torch.stack([p if isinstance(p, torch.Tensor)
                                 else torch.full_like(base, float(p), dtype=torch.float32) for p in probs])
        return self.dm.dare_map(base, xs, weights, probs=probs, **kw)


def _lane_l1(base: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    a = (x.float() - base.float()).abs().cpu()
    kept = a * keep.reshape(a.shape).float().cpu()
    return torch.stack([lane_row_sums(a), lane_row_sums(kept)], dim=1).to(base.device)


def get_kernels(name: str):
    """The kernel set named ``name`` ('cuda', 'triton' or 'torch'); BackendUnavailable when it cannot run."""
    if name == "torch":
        return TorchKernels()
    if name == "cuda":
        return CudaKernels()
    if name == "triton":
        return TritonKernels()
    raise ValueError(f"unknown GPU kernel backend {name!r} (expected 'cuda', 'triton' or 'torch')")
