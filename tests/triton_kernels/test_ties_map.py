"""pymerge.triton_kernels.ties_map against the torch TIES (``merge_tensors("ties")``), bit for bit, every
element. Thresholds come from the twin's own TopKSelector; tie counts become cutoffs by the flat positions of
the ties (torch.nonzero), independently of any kernel. Interpreter on CPU without a GPU: sizes stay small."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'pymerge[triton]')")

from pymerge.ops import merge_tensors  # noqa: E402
from pymerge.ops.select import TopKSelector, magnitude_keys  # noqa: E402

from ._interp import DEVICE, assert_bit_equal, load  # noqa: E402

tm = load("ties_map")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def topk_count(d: float, n: int) -> int:
    return n if d >= 1 else (0 if d <= 0 or n == 0 else max(1, int(d * n)))


def thresholds_and_cutoffs(base, experts, densities):
    """(keys, cutoffs) of the twin's selection: keep key > T plus the first `ties` elements equal to T."""
    n = base.numel()
    keys = torch.stack([magnitude_keys(x.float() - base.float()).reshape(-1) for x in experts])
    sel = TopKSelector([topk_count(d, n) for d in densities], n)
    sel.add_hi(keys)
    sel.end_hi()
    sel.add_lo(keys)
    cutoffs = []
    ths = sel.end_lo()
    for j, th in enumerate(ths):
        positions = torch.nonzero(keys[j] == th.key).reshape(-1)
        cutoffs.append(-1 if th.ties == 0 else int(positions[th.ties - 1]))
    return [th.key for th in ths], cutoffs


def twin(base, experts, weights, densities, out_dtype, **params):
    out = merge_tensors("ties", [base, *experts], base_index=0, params=params,
                        model_params=[{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)])
    return out.to(out_dtype)


def data(n, k, dtype, seed, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # few distinct magnitudes: thresholds split long runs of ties
        base = torch.randint(-2, 3, (n,), generator=g).to(dtype)
        experts = [torch.randint(-4, 5, (n,), generator=g).to(dtype) for _ in range(k)]
    else:
        base = torch.randn(n, generator=g).to(dtype)
        experts = [(base.float() + torch.randn(n, generator=g) * 0.05).to(dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) * 2.0 - 0.6).tolist()
    return base, experts, weights


CASES = [  # (dtype, k, n, densities, integer data)
    (torch.float32, 1, 1, [0.5], False),
    (torch.bfloat16, 2, 7, [1.0, 0.0], False),
    (torch.float16, 3, 1023, [0.3, 1.0, 1e-4], False),
    (torch.bfloat16, 4, 2049, [0.5, 0.5, 0.0, 0.9], True),
    (torch.float32, 5, 3001, [0.1, 0.7, 1.0, 0.45, 0.2], True),
    (torch.float16, 2, 4099, [0.25, 0.6], True),
]


@pytest.mark.parametrize("dtype,k,n,densities,integer", CASES)
@pytest.mark.parametrize("normalize,lambda_", [(True, 1.0), (False, 0.7)])
def test_matches_torch_ties(dtype, k, n, densities, integer, normalize, lambda_):
    base, experts, weights = data(n, k, dtype, seed=n * 7 + k, integer=integer)
    keys, cutoffs = thresholds_and_cutoffs(base, experts, densities)
    for out_dtype in DTYPES:
        want = twin(base, experts, weights, densities, out_dtype, normalize=normalize, **{"lambda": lambda_})
        got = tm.ties_map(base.to(DEVICE), [x.to(DEVICE) for x in experts], weights, keys, cutoffs,
                          lambda_=lambda_, normalize=normalize, out_dtype=out_dtype)
        assert got.device.type == DEVICE
        assert_bit_equal(got, want, f"{dtype}->{out_dtype}")


def test_stacked_input_and_out_buffer_match_list_input():
    base, experts, weights = data(1031, 3, torch.bfloat16, seed=5, integer=True)
    keys, cutoffs = thresholds_and_cutoffs(base, experts, [0.3, 0.3, 0.8])
    want = tm.ties_map(base.to(DEVICE), [x.to(DEVICE) for x in experts], weights, keys, cutoffs)
    stack = torch.stack(experts).reshape(3, 1031).to(DEVICE)
    out = torch.empty(1031, dtype=torch.bfloat16, device=DEVICE)
    got = tm.ties_map(base.to(DEVICE), stack, weights, keys, cutoffs, out=out)
    assert got is out
    assert_bit_equal(got, want.cpu())


def test_cutoff_splits_ties_exactly():
    # all |tau| equal: keep exactly the first 4 by flat index, through the cutoff alone
    base = torch.zeros(11)
    x = torch.tensor([1.0, -1, 1, -1, 1, 1, -1, 1, 1, 1, 1])
    key = int(magnitude_keys(torch.tensor([1.0])))
    got = tm.ties_map(base.to(DEVICE), [x.to(DEVICE)], [1.0], [key - 0], [3], normalize=False).cpu()
    want = torch.where(torch.arange(11) <= 3, x, torch.zeros(11))
    assert torch.equal(got, want)
    got = tm.ties_map(base.to(DEVICE), [x.to(DEVICE)], [1.0], [key], [-1], normalize=False).cpu()
    assert torch.equal(got, torch.zeros(11))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow/invalid in the interpreter
def test_special_values_match_native_cpu():
    from pymerge._native import native_module
    from pymerge.ops import native_cpu

    if native_module() is None:
        pytest.skip("pymerge._C is not built")
    base = torch.tensor([0.0, -0.0, 1.0, math.inf, 2.0, -3.0, 3e38, 0.5, 1e-40])
    experts = [torch.tensor([-0.0, 0.0, math.nan, 1.0, 2.0, 3.0, -3e38, 0.5, -1e-40]),
               torch.tensor([0.0, -0.0, 1.0, -math.inf, -2.0, -3.0, 3e38, 0.25, 2e-40])]
    for keys, cutoffs in (([-1, -1], [9, 9]), ([2**31 - 1, 0x3F000000], [-1, 4])):
        for normalize in (True, False):
            want = native_cpu.ties_map(base, experts, [0.6, 0.4], keys, cutoffs, normalize=normalize)
            got = tm.ties_map(base.to(DEVICE), [x.to(DEVICE) for x in experts], [0.6, 0.4], keys, cutoffs,
                              normalize=normalize)
            assert_bit_equal(got, want, f"keys {keys}")


def test_argument_errors():
    a = torch.randn(5, device=DEVICE)
    with pytest.raises(ValueError, match="at least one expert"):
        tm.ties_map(a, [], [], [], [])
    with pytest.raises(ValueError, match="2 values for 1 experts"):
        tm.ties_map(a, [a], [1.0, 2.0], [0], [0])
    with pytest.raises(ValueError, match=r"thresh_keys\[0\]"):
        tm.ties_map(a, [a], [1.0], [2**31], [0])
    with pytest.raises(ValueError, match=r"experts\[0\]"):
        tm.ties_map(a, [a.half()], [1.0], [0], [0])
    with pytest.raises(TypeError, match="not supported"):
        tm.ties_map(a, [a], [1.0], [0], [0], out_dtype=torch.float64)
    with pytest.raises(ValueError, match="finite"):
        tm.ties_map(a, [a], [math.nan], [0], [0])


@pytest.mark.parametrize("normalize", [True, False])
def test_without_consensus_is_task_arithmetic_on_trimmed_vectors(normalize):
    base, experts, weights = data(2053, 3, torch.bfloat16, seed=8, integer=True)
    weights = [0.5, -0.25, 0.125] if normalize else weights
    keys, cutoffs = thresholds_and_cutoffs(base, experts, [0.3, 0.6, 1.0])
    # oracle in plain torch ops: d_j = (t_j * keep_j) * w_j summed in order, one fp32 divisor, lambda 0.5
    i = torch.arange(2053)
    acc, div = None, None
    for x, key, cut, w in zip(experts, keys, cutoffs, weights):
        t = x.float() - base.float()
        kk = magnitude_keys(t)
        keep = (kk > key) | ((kk == key) & (i <= cut))
        d = (t * keep.float()) * torch.tensor(w, dtype=torch.float32)
        acc = d if acc is None else acc + d
        wt = torch.tensor(w, dtype=torch.float32)
        div = wt if div is None else div + wt
    r = acc / (div if abs(float(div)) >= 1e-8 else 1.0) if normalize else acc
    want = (base.float() + r * torch.tensor(0.5, dtype=torch.float32)).to(torch.bfloat16)
    got = tm.ties_map(base.to(DEVICE), [x.to(DEVICE) for x in experts], weights, keys, cutoffs, lambda_=0.5,
                      normalize=normalize, consensus=False)
    assert_bit_equal(got, want)
