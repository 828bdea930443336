"""Breadcrumbs on the native CPU kernels (``MagnitudeTopK`` with two selections per expert, ``tie_cutoffs``,
``ties_map`` with inner thresholds) against the torch breadcrumbs / breadcrumbs_ties, bit for bit, on data with
many exact ties at both thresholds (small integers), odd sizes, and the degenerate densities and gammas."""

from __future__ import annotations

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason
from pymerge.methods.sparsify import breadcrumb_ks
from pymerge.ops import merge_tensors

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")


def native_breadcrumbs(base, experts, weights, densities, gammas, *, consensus, out_dtype):
    from pymerge.ops import native_cpu as nc

    n = base.numel()
    ks, src = [], []
    for e, (d, g) in enumerate(zip(densities, gammas)):
        ks += breadcrumb_ks(d, g, n)
        src += [e, e]
    ths = nc.MagnitudeTopK(ks, n, src).run(base, experts)
    keys = [th.key for th in ths]
    cutoffs, _ = nc.tie_cutoffs(base, [experts[s] for s in src], keys, [nc.tie_budget(th) for th in ths])
    return nc.ties_map(base, experts, weights, keys[0::2], cutoffs[0::2], inner_keys=keys[1::2],
                       inner_cutoffs=cutoffs[1::2], normalize=False, consensus=consensus, out_dtype=out_dtype)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("dtype,n,densities,gammas", [
    (torch.bfloat16, 1, [0.5], [0.1]),
    (torch.float32, 7, [0.5, 1.0], [0.2, 0.01]),
    (torch.bfloat16, 1031, [0.4, 0.7, 0.0], [0.05, 0.3, 0.01]),
    (torch.float16, 70001, [0.3, 0.6, 0.9], [0.01, 0.1, 0.0]),
    (torch.bfloat16, 4099, [0.35, 0.5], [0.15, 0.25]),  # |tau| in {0..5} only: both cutoffs split ties
])
def test_matches_torch_twin(method, dtype, n, densities, gammas):
    g = torch.Generator().manual_seed(n)
    base = torch.randint(-3, 4, (n,), generator=g).to(dtype)
    experts = [(base.float() + torch.randint(-5, 6, (n,), generator=g)).to(dtype) for _ in densities]
    if n == 4099:
        base = torch.zeros(n, dtype=dtype)
    weights = [0.7, -0.4, 1.1][:len(densities)]
    want = merge_tensors(method, [base, *experts], base_index=0, params={},
                         model_params=[{}] + [{"weight": w, "density": d, "gamma": gm}
                                              for w, d, gm in zip(weights, densities, gammas)])
    for out_dtype in (dtype, torch.float32):
        got = native_breadcrumbs(base, experts, weights, densities, gammas, consensus=method == "breadcrumbs_ties",
                                 out_dtype=out_dtype)
        assert torch.equal(got.float().view(torch.int32), want.to(out_dtype).float().view(torch.int32)), out_dtype


def test_inner_arguments_are_checked():
    from pymerge.ops import native_cpu as nc

    a = torch.randn(5)
    with pytest.raises(ValueError, match="inner_keys"):
        nc.ties_map(a, [a], [1.0], [0], [5], inner_keys=[0, 1], inner_cutoffs=[5])
