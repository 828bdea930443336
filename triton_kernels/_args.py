"""Host-side argument checks shared by the Triton ops (plain torch; no Triton import)."""

from __future__ import annotations

from typing import Sequence, Union

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

Experts = Union[torch.Tensor, Sequence[torch.Tensor]]


def check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{what}: dtype {dtype} is not supported (expected float32, float16 or bfloat16)")


def check_contiguous(x: object, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_contiguous():
        raise ValueError(f"{what}: expected a contiguous tensor (call .contiguous() first)")
    return x


def stack_experts(experts: Experts, like: torch.Tensor, what: str = "experts") -> torch.Tensor:
    """The experts as one [k, like.numel()] tensor of contiguous rows (a view when already stacked), after checking
    each matches ``like`` in shape, dtype and device.

    A stacked tensor of shape [k, *like.shape] is used as it is (the GPU executor keeps its chunks stacked),
    as a view with its own row stride: each expert must be contiguous, the stack as a whole need not be (a
    chunk's first rows of a larger buffer); a list is stacked (one copy).
    """
    check_contiguous(like, "base")
    check_dtype(like.dtype, "base")
    if isinstance(experts, torch.Tensor):
        if experts.dim() >= 1 and experts.shape[0] > 0:
            check_contiguous(experts[0], f"{what}[0]")  # every expert has the same strides
        if experts.dim() == 0 or tuple(experts.shape[1:]) != tuple(like.shape) or experts.shape[0] == 0:
            raise ValueError(f"{what}: expected a [k, {', '.join(map(str, like.shape))}] stack with k >= 1, "
                             f"got shape {tuple(experts.shape)}")
        if experts.dtype != like.dtype or experts.device != like.device:
            raise ValueError(f"{what}: {experts.dtype} on {experts.device} differs from base: "
                             f"{like.dtype} on {like.device}")
        return experts.flatten(1) if experts.dim() > 1 else experts.reshape(experts.shape[0], 1)
    if len(experts) == 0:
        raise ValueError(f"{what}: expected at least one expert")
    for j, x in enumerate(experts):
        check_contiguous(x, f"{what}[{j}]")
        if x.shape != like.shape or x.dtype != like.dtype or x.device != like.device:
            raise ValueError(f"{what}[{j}]: {tuple(x.shape)} {x.dtype} on {x.device} differs from base: "
                             f"{tuple(like.shape)} {like.dtype} on {like.device}")
    return torch.stack([x.reshape(-1) for x in experts])


def per_expert(values: Sequence, k: int, what: str) -> list:
    values = list(values)
    if len(values) != k:
        raise ValueError(f"{what}: got {len(values)} values for {k} experts (one per expert)")
    return values


def f32_finite(values: Sequence[float], what: str) -> torch.Tensor:
    """``values`` rounded to fp32 (CPU tensor); ValueError when one is not finite in fp32."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: must be finite in float32, got {list(values)}")
    return t


def thresh_tensor(keys: Sequence[int]) -> torch.Tensor:
    """Threshold keys as int32, each in [-1, 2^31 - 1] (radix_select.h: kKeepAll .. kKeepNone)."""
    keys = [int(t) for t in keys]
    for j, t in enumerate(keys):
        if not -1 <= t <= 2**31 - 1:
            raise ValueError(f"thresh_keys[{j}]: must be a magnitude key in [-1, 2^31 - 1], got {t}")
    return torch.tensor(keys, dtype=torch.int32)


def keep_limit(prob, count: int, device: torch.device):
    """(per-element probability tensor or None, scalar limit) of a Philox keep mask over ``count`` elements:
    ``prob`` a contiguous fp32 tensor of ``count`` probabilities on ``device`` (limit unused, 0), or a float p,
    whose limit fp32(p) * 2^24 (as philox.keep_mask) is exact in the kernels' fp32 argument: scaling by a power
    of two."""
    if isinstance(prob, torch.Tensor):
        check_contiguous(prob, "prob")
        if prob.dtype != torch.float32 or prob.numel() != count or prob.device != device:
            raise ValueError(f"prob: expected {count} float32 probabilities on {device}, got {prob.numel()} "
                             f"{prob.dtype} on {prob.device}")
        return prob, 0.0
    p = float(prob)
    if p != p:
        raise ValueError(f"prob: must be a probability, got {p}")
    return None, float(torch.tensor(p, dtype=torch.float32)) * float(1 << 24)
