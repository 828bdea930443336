"""pymerge.triton_kernels.dare_map: keep masks bit-identical to pymerge.ops.philox.keep_mask, and whole maps
bit-identical to the torch twins (``merge_tensors`` with dare_ties, dare_linear, della, della_linear), every
element, odd sizes and odd stream offsets. Interpreter on CPU without a GPU: sizes stay small."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'pymerge[triton]')")

from pymerge.methods.sparsify import della_probabilities  # noqa: E402
from pymerge.ops import merge_tensors  # noqa: E402
from pymerge.ops.exact_sum import lane_row_sums  # noqa: E402
from pymerge.ops.philox import keep_mask  # noqa: E402

from ._interp import DEVICE, assert_bit_equal, load  # noqa: E402

dm = load("dare_map")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def mask_via_map(n, prob, *, seed, model, name, start):
    """The kernel's keep mask read back exactly: base 0, one expert of ones, no scaling -> out = keep."""
    base = torch.zeros(n, device=DEVICE)
    ones = torch.ones(1, n, device=DEVICE)
    return dm.dare_map(base, ones, [1.0], seed=seed, model_ids=[model], tensor_name=name, probs=[prob],
                       start=start, consensus=None).cpu()


@pytest.mark.parametrize("n,start", [(1, 0), (3, 1), (7, 2), (1029, 3), (2053, 4 * 2**32 + 1), (4099, 17)])
@pytest.mark.parametrize("prob", [0.1, 0.5, 0.9, 1.0, 0.0])
def test_keep_mask_bit_identical_to_torch_philox(n, start, prob):
    seed = 0x1234_5678_9ABC_DEF0 + n
    got = mask_via_map(n, prob, seed=seed, model=3 + n % 5, name=f"layer.{n}.weight", start=start)
    want = keep_mask(seed, 3 + n % 5, f"layer.{n}.weight", start, n, prob)
    assert torch.equal(got, want.float())
    if 0 < prob < 1 and n > 1000:
        assert 0 < int(want.sum()) < n  # not a degenerate mask


def test_per_element_probabilities_bit_identical():
    n = 1031
    g = torch.Generator().manual_seed(1)
    p = torch.rand(n, generator=g)
    base = torch.zeros(n, device=DEVICE)
    got = dm.dare_map(base, torch.ones(1, n, device=DEVICE), [1.0], seed=7, model_ids=[2], tensor_name="w",
                      probs=p.reshape(1, n).to(DEVICE), start=5, consensus=None).cpu()
    assert torch.equal(got, keep_mask(7, 2, "w", 5, n, p).float())


def data(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(dtype)
    experts = [(base.float() + torch.randn(n, generator=g) * 0.05).to(dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) * 2.0 - 0.6).tolist()
    return base, experts, weights


def l1_scales(base, experts, masks):
    """mergekit's L1 rescale, as the twin computes it: fp64 sums in eight lanes, skipped below 1e-7."""
    out = []
    for x, m in zip(experts, masks):
        tau = (x.float() - base.float()).abs()
        b, a = float(lane_row_sums(tau)), float(lane_row_sums(tau * m))
        out.append(b / a if b >= 1e-7 and a >= 1e-7 else 1.0)
    return out


METHODS = {"dare_ties": "sum", "dare_linear": None, "della": "sum", "della_linear": None}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype,k,n,densities", [
    (torch.float32, 1, 1, [0.5]),
    (torch.bfloat16, 2, 7, [0.5, 1.0]),
    (torch.float16, 3, 1029, [0.3, 0.8, 0.5]),
    (torch.bfloat16, 4, 2051, [0.5, 0.2, 1.0, 0.6]),
])
@pytest.mark.parametrize("rescale,normalize,lambda_", [(True, None, 1.0), (False, True, 0.8)])
def test_matches_torch_twin(method, dtype, k, n, densities, rescale, normalize, lambda_):
    base, experts, weights = data(n, k, dtype, seed=n * 3 + k)
    seed, name, ids = 99 + n, "model.layers.0.mlp.weight", [4, 1, 7, 2][:k]
    params = {"rescale": rescale, "lambda": lambda_}
    if normalize is not None:
        params["normalize"] = normalize
    eps = 0.1
    mparams = [{"weight": w, "density": d, **({"epsilon": eps} if method.startswith("della") else {})}
               for w, d in zip(weights, densities)]
    full = merge_tensors(method, [base, *experts], base_index=0, params=params, model_params=[{}] + mparams,
                         seed=seed, name=name, model_ids=[0, *ids])
    if method.startswith("della"):
        probs = torch.stack([
            torch.ones(n) if d >= 1 else della_probabilities((x.float() - base.float()).reshape(1, n), d, eps, n)
            .reshape(n) for x, d in zip(experts, densities)])
        masks = [keep_mask(seed, i, name, 0, n, p) for i, p in zip(ids, probs)]
        prob_arg = probs.to(DEVICE)
    else:
        masks = [keep_mask(seed, i, name, 0, n, d) for i, d in zip(ids, densities)]
        prob_arg = densities
    scales = [s if rescale and d < 1 else 1.0 for s, d in zip(l1_scales(base, experts, masks), densities)]
    norm = normalize if normalize is not None else method == "della"
    for out_dtype in (dtype, torch.float32):
        got = dm.dare_map(base.to(DEVICE), [x.to(DEVICE) for x in experts], weights, seed=seed, model_ids=ids,
                          tensor_name=name, probs=prob_arg, scales=scales, consensus=METHODS[method],
                          normalize=norm, lambda_=lambda_, out_dtype=out_dtype)
        assert_bit_equal(got, full.to(out_dtype), f"{method} {dtype}->{out_dtype}")


@pytest.mark.parametrize("consensus", ["sum", "count", None])
def test_chunks_at_stream_offsets_equal_the_whole(consensus):
    base, experts, weights = data(3001, 3, torch.bfloat16, seed=11)
    kw = dict(seed=5, model_ids=[1, 2, 3], tensor_name="t", probs=[0.3, 0.6, 0.9], scales=[1.5, 1.0, 0.75],
              consensus=consensus, normalize=consensus == "sum")
    stack = torch.stack(experts).to(DEVICE)
    whole = dm.dare_map(base.to(DEVICE), stack, weights, **kw).cpu()
    parts = [dm.dare_map(base[a:b].to(DEVICE), stack[:, a:b].contiguous(), weights, start=a, **kw).cpu()
             for a, b in ((0, 5), (5, 1030), (1030, 3001))]
    assert torch.equal(torch.cat(parts).view(torch.int16), whole.view(torch.int16))


def test_count_consensus_matches_twin():
    base, experts, weights = data(1027, 3, torch.float32, seed=4)
    full = merge_tensors("dare_ties", [base, *experts], base_index=0,
                         params={"rescale": False, "consensus_method": "count"},
                         model_params=[{}] + [{"weight": w, "density": 0.5} for w in weights], seed=3, name="c")
    got = dm.dare_map(base.to(DEVICE), [x.to(DEVICE) for x in experts], weights, seed=3, model_ids=[1, 2, 3],
                      tensor_name="c", probs=[0.5] * 3, consensus="count")
    assert_bit_equal(got, full)


def test_argument_errors():
    a = torch.randn(5, device=DEVICE)
    kw = dict(seed=1, model_ids=[1], tensor_name="t", probs=[0.5])
    with pytest.raises(ValueError, match="consensus"):
        dm.dare_map(a, [a], [1.0], consensus="max", **kw)
    with pytest.raises(ValueError, match="start"):
        dm.dare_map(a, [a], [1.0], start=-1, **kw)
    with pytest.raises(ValueError, match="probs"):
        dm.dare_map(a, [a], [1.0], seed=1, model_ids=[1], tensor_name="t", probs=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="2 values for 1 experts"):
        dm.dare_map(a, [a], [1.0, 1.0], **kw)
