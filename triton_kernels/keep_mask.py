"""Triton Philox keep masks: keep[i] = float(word >> 8) < fp32(p) * 2^24 for flat elements [start, start + n).

Bit-identical to ``pymerge.ops.philox.keep_mask`` (element e of the tensor draws word e of the stream (seed,
model, name_hash(tensor name))) and to ``native_cuda.philox_keep_mask``; ``p`` is one probability or one fp32
probability per element (DELLA). The GPU executor's L1 rescale pass needs the masks themselves; the torch twin
took 15 s of a 0.8 GB dare_ties merge on an H100 (2026-11-23) where the CUDA kernel set took 1.4 s in all.
"""

from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl

from ._args import keep_limit
from ._common import philox_tile, uniform24

BLOCK_SIZE = 1024  # elements per program: 256 Philox blocks of 4 words, as the DARE map
_MASK32 = 0xFFFFFFFF


@triton.jit(do_not_specialize=["n", "phase", "block0", "key0", "key1", "model", "name_hash", "limit"])
def _keep_mask_kernel(p_ptr, out_ptr, n, phase, block0, key0, key1, model, name_hash, limit,
                      PER_ELEMENT: tl.constexpr, BLOCK: tl.constexpr):
    i, mask, c0, c1, c3, lane = philox_tile(tl.program_id(0), phase, block0, n, name_hash, BLOCK)
    c2 = tl.full(c0.shape, 0, tl.uint32) + model.to(tl.uint32)
    u = uniform24(c0, c1, c2, c3, key0.to(tl.uint32), key1.to(tl.uint32), lane)
    if PER_ELEMENT:
        lim = tl.load(p_ptr + i, mask=mask, other=0.0) * 16777216.0  # exact: times 2^24
    else:
        lim = limit
    tl.store(out_ptr + i, (u < lim).to(tl.uint8), mask=mask)


def keep_mask(seed: int, model: int, tensor_name: str, start: int, count: int,
              prob: Union[float, torch.Tensor], *, device: Union[torch.device, str]) -> torch.Tensor:
    """The bool keep mask of ``count`` elements on ``device`` (formula in the module docstring). ``prob``: a
    float, or a contiguous fp32 tensor of ``count`` per-element probabilities on ``device``."""
    from pymerge.ops.philox import name_hash

    count, start = int(count), int(start)
    if count < 0 or start < 0:
        raise ValueError(f"start and count: must be >= 0, got start={start}, count={count}")
    device = torch.device(device)
    out = torch.empty(count, dtype=torch.bool, device=device)
    p_tensor, limit = keep_limit(prob, count, device)
    if count == 0:
        return out
    seed = int(seed) & ((1 << 64) - 1)
    phase = start % 4
    _keep_mask_kernel[(triton.cdiv(count + phase, BLOCK_SIZE),)](
        out if p_tensor is None else p_tensor, out.view(torch.uint8), count, phase, start // 4, seed & _MASK32,
        seed >> 32, int(model) & _MASK32, name_hash(tensor_name) & _MASK32, limit, PER_ELEMENT=p_tensor is not None,
        BLOCK=BLOCK_SIZE)
    return out
