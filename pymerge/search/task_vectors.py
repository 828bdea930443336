"""Resident task vectors for in-memory search: one flat fp32 vector per expert, on the tensors' device.

The merged names are the floating-point tensors that the base and every expert hold with one shape (minus
``exclude`` regexes); everything else is passed through from the base. Flat vectors make the whole-model
statistics the seed-group methods use (global quantiles of PCB, NPS) a single tensor op, and let a candidate
be materialised as ``base + delta`` then split back into named views cast to the base's dtypes.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from ..errors import ConfigError, MergeError


class TaskVectors:
    """base (flat fp32) and tau[t] = expert_t - base (a [T, D] fp32 tensor), plus the layout to unflatten."""

    def __init__(self, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 exclude: Sequence[str] = ()):
        if len(experts) < 1:
            raise ConfigError("search: needs at least one expert state dict")
        patterns = [re.compile(p) for p in exclude]
        self.names: list[str] = []
        self.passthrough: dict[str, torch.Tensor] = {}
        for name, t in base.items():
            if not torch.is_tensor(t):
                raise ConfigError(f"search: base entry '{name}' is not a tensor ({type(t).__name__})")
            if not t.is_floating_point() or any(p.search(name) for p in patterns):
                self.passthrough[name] = t
                continue
            for i, e in enumerate(experts):
                if name not in e:
                    raise MergeError(f"search: expert {i} has no tensor '{name}' (the base has it)")
                if tuple(e[name].shape) != tuple(t.shape):
                    raise MergeError(f"search: tensor '{name}' of expert {i} has shape {list(e[name].shape)}, "
                                     f"expected {list(t.shape)} like the base")
            self.names.append(name)
        if not self.names:
            raise ConfigError("search: no floating-point tensors to merge (all excluded?)")
        first = base[self.names[0]]
        self.device = first.device
        self.shapes = [tuple(base[n].shape) for n in self.names]
        self.dtypes = [base[n].dtype for n in self.names]
        self.sizes = [base[n].numel() for n in self.names]
        self.order = list(base)  # the output keeps the base's key order
        self.base = self._flat(base)
        self.tau = torch.stack([self._flat(e) - self.base for e in experts])

    def _flat(self, sd: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([sd[n].detach().to(self.device, torch.float32).reshape(-1) for n in self.names])

    @property
    def count(self) -> int:
        return self.tau.shape[0]

    @property
    def numel(self) -> int:
        return self.tau.shape[1]

    def state_dict(self, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The merged model ``base + delta`` as a state dict (base key order and dtypes; one rounding cast)."""
        merged = self.base + delta
        out: dict[str, torch.Tensor] = {}
        parts = dict(zip(self.names, torch.split(merged, self.sizes)))
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            parts[name] = parts[name].reshape(shape).to(dtype)
        for name in self.order:
            out[name] = parts[name] if name in parts else self.passthrough[name]
        return out

    def tensor_slices(self) -> list[tuple[str, int, int]]:
        """(name, start, stop) of each merged tensor in the flat layout."""
        out, start = [], 0
        for name, size in zip(self.names, self.sizes):
            out.append((name, start, start + size))
            start += size
        return out


def topk_keep(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest |x| of a 1-D tensor, ties at the threshold kept by lowest index: the semantics of
    ``pymerge.ops.topk_mask``, written with ``kthvalue`` so it runs on any device."""
    n = x.numel()
    if k <= 0:
        return torch.zeros_like(x, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(x, dtype=torch.bool)
    mag = x.abs()
    th = torch.kthvalue(mag, n - k + 1).values
    above = mag > th
    need = k - int(above.sum())
    equal = mag == th
    return above | (equal & (torch.cumsum(equal, 0) <= need))


def flat_quantile(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th smallest entry (0-based) of each row of a [rows, D] tensor: ``sorted(x)[index]``."""
    return torch.kthvalue(x, index + 1, dim=1, keepdim=True).values
