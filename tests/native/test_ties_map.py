"""pymerge._C TIES map (via pymerge.ops.native_cpu) against the torch TIES, bit for bit.

The twin is ``pymerge.ops.merge_tensors("ties", ...)`` (fp32 result) cast with ``.to(out_dtype)``; the native
map gets its thresholds either from ``pymerge.ops.select.TopKSelector`` (the twin's own selection; every tie
count goes through ``tie_cutoffs``) or from the native histograms (``ties_tensor``, where "all ties kept"
needs no cutoff scan). The tie cutoffs are also checked against the flat positions of the ties. NaN outputs
are compared as NaN (payloads are not reproducible, see dtype_cast.h); every other element must have
identical bits.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason
from pymerge.ops import merge_tensors
from pymerge.ops.select import TopKSelector, magnitude_keys

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _native():
    from pymerge.ops import native_cpu

    return native_cpu


def twin(base, experts, weights, densities, *, lambda_=1.0, normalize=True, out_dtype=None):
    out = merge_tensors("ties", [base, *experts], base_index=0, params={"lambda": lambda_, "normalize": normalize},
                        model_params=[{}] + [{"weight": w, "density": d} for w, d in zip(weights, densities)])
    return out.to(base.dtype if out_dtype is None else out_dtype)


def selector_thresholds(base, experts, densities):
    """(keys, tie budgets) from the twin's own TopKSelector; the budgets are its tie counts."""
    n = base.numel()
    keys = torch.stack([magnitude_keys(x.float() - base.float()).reshape(-1) for x in experts])
    sel = TopKSelector([_native().topk_count(d, n) for d in densities], n)
    sel.add_hi(keys)
    sel.end_hi()
    sel.add_lo(keys)
    ths = sel.end_lo()
    return [th.key for th in ths], [th.ties for th in ths]


def selector_map(base, experts, weights, densities, **kw):
    """ties_map with the TopKSelector thresholds, the tie counts turned into cutoffs (checked on the way)."""
    keys, budgets = selector_thresholds(base, experts, densities)
    cutoffs, left = _native().tie_cutoffs(base, experts, keys, budgets)
    assert (cutoffs, left) == expected_cutoffs(base, experts, keys, budgets)
    return _native().ties_map(base, experts, weights, keys, cutoffs, **kw)


def expected_cutoffs(base, experts, keys, budgets):
    """The tie_cutoffs contract from the flat positions of the ties (torch.nonzero)."""
    n = base.numel()
    cutoffs, left = [], []
    for x, key, budget in zip(experts, keys, budgets):
        ties = torch.nonzero(magnitude_keys(x.float() - base.float()).reshape(-1) == key).reshape(-1)
        if budget < 0:
            cutoffs.append(n), left.append(budget)
        elif budget == 0:
            cutoffs.append(-1), left.append(0)
        elif budget <= ties.numel():
            cutoffs.append(int(ties[budget - 1])), left.append(0)
        else:
            cutoffs.append(n), left.append(budget - ties.numel())
    return cutoffs, left


def assert_bit_equal(out, ref, what=""):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    view = _INT_VIEW[out.dtype]
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    diff = ((out.view(view) != ref.view(view)) & ~(nan_out & nan_ref)).reshape(-1)
    if bool(diff.any()):
        i = int(diff.nonzero()[0])
        pytest.fail(f"{what}: {int(diff.sum())} of {out.numel()} elements differ from the torch TIES; first at "
                    f"{i}: got {out.reshape(-1)[i].item()!r}, twin {ref.reshape(-1)[i].item()!r}")


def _data(n, k, dtype, seed, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # heavy ties: few distinct magnitudes, so thresholds split long runs of equal keys
        base = torch.randint(-2, 3, (n,), generator=g).to(dtype)
        experts = [torch.randint(-4, 5, (n,), generator=g).to(dtype) for _ in range(k)]
    else:
        base = torch.randn(n, generator=g).to(dtype)
        scale = torch.exp2(torch.randint(-6, 3, (n,), generator=g).float())
        experts = [(base.float() + torch.randn(n, generator=g) * scale * 0.05).to(dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) * 2.0 - 0.6).tolist()  # some negative
    return base, experts, weights


# (dtype, experts, size, densities): every dtype, 1..5 experts, odd sizes, densities 1.0, tiny and 0.
CASES = [
    (torch.float32, 1, 1, [0.5]),
    (torch.bfloat16, 2, 1, [1.0, 0.0]),
    (torch.float16, 2, 7, [0.3, 1.0]),
    (torch.float32, 3, 1023, [0.2, 1e-6, 1.0]),
    (torch.bfloat16, 4, 1023, [0.5, 0.5, 0.0, 0.9]),
    (torch.float16, 5, 65537, [0.1, 0.7, 1.0, 1e-4, 0.45]),
    (torch.bfloat16, 3, 65537, [0.25, 0.25, 0.25]),
    (torch.float32, 5, 65537, [1.0, 1.0, 1.0, 1.0, 1.0]),
    (torch.bfloat16, 2, 1_000_003, [0.2, 1e-6]),
    (torch.float16, 1, 1_000_003, [0.35]),
    # 1-4 experts: the fused register tile (its tiles without a tie cutoff); 5+: the staged tile only
    (torch.bfloat16, 8, 70001, [0.3, 0.5, 1.0, 0.0, 0.9, 0.1, 0.25, 0.6]),
    (torch.bfloat16, 9, 70001, [0.3, 0.5, 1.0, 0.0, 0.9, 0.1, 0.25, 0.6, 0.45]),
]


@pytest.mark.parametrize("dtype,k,size,densities", CASES,
                         ids=[f"{str(c[0])[6:]}-k{c[1]}-n{c[2]}" for c in CASES])
def test_matches_torch_ties(dtype, k, size, densities):
    base, experts, weights = _data(size, k, dtype, seed=size * 10 + k)
    for normalize, lambda_ in ((True, 1.0), (False, 0.7)):
        ref = twin(base, experts, weights, densities, lambda_=lambda_, normalize=normalize)
        got = _native().ties_tensor(base, experts, weights, densities, lambda_=lambda_, normalize=normalize)
        assert_bit_equal(got, ref, f"ties_tensor normalize={normalize} lambda={lambda_}")
        got = selector_map(base, experts, weights, densities, lambda_=lambda_, normalize=normalize)
        assert_bit_equal(got, ref, f"ties_map with TopKSelector thresholds, normalize={normalize}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [4099, 300007])
def test_heavy_ties(dtype, size):
    """Integer-valued data: the threshold key is shared by a large share of the elements, so the tie cutoff
    splits long runs of equal keys, inside tiles and OpenMP blocks."""
    base, experts, weights = _data(size, 4, dtype, seed=size, integer=True)
    densities = [0.3, 0.05, 0.5, 0.77]
    keys, budgets = selector_thresholds(base, experts, densities)
    assert all(b > 0 for b in budgets) and sum(budgets) > size // 20, budgets  # ties really get split
    for normalize, lambda_ in ((True, 1.3), (False, 1.0)):
        ref = twin(base, experts, weights, densities, lambda_=lambda_, normalize=normalize)
        assert_bit_equal(selector_map(base, experts, weights, densities, lambda_=lambda_, normalize=normalize),
                         ref, "ties_map")
        assert_bit_equal(_native().ties_tensor(base, experts, weights, densities, lambda_=lambda_,
                                               normalize=normalize), ref, "ties_tensor")


def test_tie_cutoffs_contract():
    """Budgets of every size: none, one, all ties, more than the ties (the rest carried over), keep-all."""
    base, experts, _ = _data(300007, 2, torch.bfloat16, seed=4, integer=True)
    keys = [int(magnitude_keys(torch.tensor(3.0))), int(magnitude_keys(torch.tensor(1.0)))]
    ties = [int((magnitude_keys(x.float() - base.float()) == t).sum()) for x, t in zip(experts, keys)]
    for budgets in ([0, 1], [1, 0], [ties[0], ties[1] - 1], [ties[0] + 5, ties[1] + 1], [-1, 7],
                    [ties[0] // 2, 3 * ties[1] // 4], [70000, 123456]):
        got = _native().tie_cutoffs(base, experts, keys, budgets)
        assert got == expected_cutoffs(base, experts, keys, budgets), budgets


def test_chunks_carry_tie_budgets():
    """Chunk by chunk, each chunk's cutoffs found with the budgets the previous chunk left, equals one call."""
    base, experts, weights = _data(200003, 3, torch.bfloat16, seed=5, integer=True)
    densities = [0.4, 0.1, 0.6]
    keys, budgets = selector_thresholds(base, experts, densities)
    whole = selector_map(base, experts, weights, densities)
    parts, left = [], list(budgets)
    for a, b in ((0, 1), (1, 40000), (40000, 40000), (40000, 123457), (123457, 200003)):
        chunk, chunk_experts = base[a:b], [x[a:b] for x in experts]
        cutoffs, left = _native().tie_cutoffs(chunk, chunk_experts, keys, left)
        parts.append(_native().ties_map(chunk, chunk_experts, weights, keys, cutoffs))
    assert left == [0, 0, 0]
    assert_bit_equal(torch.cat(parts), whole, "chunked")
    assert_bit_equal(whole, twin(base, experts, weights, densities), "whole")


def test_keep_all_ties_cutoff():
    """A cutoff at or past the end keeps every element equal to the key (global trim's "keep all ties")."""
    base, experts, weights = _data(65537, 2, torch.float32, seed=9, integer=True)
    keys = [int(magnitude_keys(torch.tensor(2.0))), int(magnitude_keys(torch.tensor(3.0)))]
    got = _native().ties_map(base, experts, weights, keys, [65536, 2**62], normalize=False)
    tau = torch.stack([x - base for x in experts])
    kept = tau * (magnitude_keys(tau) >= torch.tensor(keys).view(2, 1)) * torch.tensor(weights).float().view(2, 1)
    elected = torch.where(kept[0] + kept[1] >= 0, 1.0, -1.0)
    agree = torch.sign(kept) == elected
    ref = base + ((kept[0] * agree[0]) + (kept[1] * agree[1]))
    assert_bit_equal(got, ref, "keep all ties")


@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_output_dtypes(in_dtype, out_dtype):
    base, experts, weights = _data(70001, 3, in_dtype, seed=11)
    densities = [0.3, 0.6, 1.0]
    got = _native().ties_tensor(base, experts, weights, densities, lambda_=0.5, out_dtype=out_dtype)
    assert_bit_equal(got, twin(base, experts, weights, densities, lambda_=0.5, out_dtype=out_dtype), "out_dtype")


def test_in_place_on_base():
    base, experts, weights = _data(100003, 2, torch.bfloat16, seed=12, integer=True)
    densities = [0.5, 0.2]
    ref = twin(base, experts, weights, densities)
    keys, budgets = selector_thresholds(base, experts, densities)
    cutoffs, _ = _native().tie_cutoffs(base, experts, keys, budgets)
    out = base.clone()
    _C.ties_map(out.data_ptr(), [x.data_ptr() for x in experts], 2, out.numel(), weights, keys, cutoffs, 1.0,
                True, out.data_ptr(), 2)
    assert_bit_equal(out, ref, "in place")


def test_special_values_and_zero_divisor():
    """Signed zeros, infinities, overflow of the sums, NaN away from the thresholds, and agreeing weights that
    sum to 0 (the divisor becomes 1)."""
    inf, nan = math.inf, math.nan
    base = torch.tensor([0.0, -0.0, 1.0, 3e38, -3e38, 1.0, 2.0, 0.0, 5.0, -0.0, 1.0, 1.0, 7.0, 1.0])
    e0 = torch.tensor([-0.0, 0.0, inf, -3e38, 3e38, nan, 3.0, 1.0, 5.0, -0.0, 2.0, 0.0, 7.5, 1.0])
    e1 = torch.tensor([0.0, -0.0, -inf, -3e38, 3e38, 1.0, 1.0, -1.0, 5.0, 0.0, 0.0, 2.0, 6.5, 1.0])
    base, e0, e1 = (torch.cat([t] * 50) for t in (base, e0, e1))  # n = 700: thresholds land on ordinary values
    for weights in ([1.0, -1.0], [0.5, 0.25], [-2.0, -3.0]):
        for densities in ([1.0, 1.0], [0.5, 0.9], [0.2, 0.3]):
            for normalize in (True, False):
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    args = (base.to(dtype), [e0.to(dtype), e1.to(dtype)], weights, densities)
                    ref = twin(*args, normalize=normalize, lambda_=0.9)
                    got = _native().ties_tensor(*args, normalize=normalize, lambda_=0.9)
                    assert_bit_equal(got, ref, f"{dtype} w={weights} d={densities} normalize={normalize}")


def test_empty_tensor():
    out = _native().ties_tensor(torch.empty(0, 3), [torch.empty(0, 3)], [1.0], [0.5])
    assert out.shape == (0, 3)


_SUBPROCESS = """
import hashlib, torch
from pymerge.ops import native_cpu
g = torch.Generator().manual_seed(77)
base = torch.randint(-2, 3, (400009,), generator=g).to(torch.bfloat16)
experts = [torch.randint(-4, 5, (400009,), generator=g).to(torch.bfloat16) for _ in range(3)]
out = native_cpu.ties_tensor(base, experts, [1.0, -0.5, 0.8], [0.3, 0.45, 0.05], lambda_=1.1)
print(hashlib.sha256(out.view(torch.int16).numpy().tobytes()).hexdigest())
"""


def test_independent_of_thread_count():
    """Block-to-thread assignment and the tie-cutoff waves follow the thread count; the output must not. This
    process runs the machine's cores (or OMP_NUM_THREADS) and a subprocess 3 threads."""
    g = torch.Generator().manual_seed(77)
    base = torch.randint(-2, 3, (400009,), generator=g).to(torch.bfloat16)
    experts = [torch.randint(-4, 5, (400009,), generator=g).to(torch.bfloat16) for _ in range(3)]
    args = (base, experts, [1.0, -0.5, 0.8], [0.3, 0.45, 0.05])
    here = _native().ties_tensor(*args, lambda_=1.1)
    assert_bit_equal(here, twin(*args, lambda_=1.1), "this process")
    want = hashlib.sha256(here.view(torch.int16).numpy().tobytes()).hexdigest()
    for threads in ("3",):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == want, f"OMP_NUM_THREADS={threads} gives a different output"


def test_argument_errors():
    x, b, out = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    p = [x.data_ptr()]
    ok = dict(weights=[1.0], thresh_keys=[5], tie_cutoffs=[3], lambda_=1.0, normalize=True, out_dtype=0)

    def call(base=b.data_ptr(), experts=p, dtype=0, n=8, out_ptr=out.data_ptr(), **kw):
        a = dict(ok, **kw)
        return _C.ties_map(base, experts, dtype, n, a["weights"], a["thresh_keys"], a["tie_cutoffs"],
                           a["lambda_"], a["normalize"], out_ptr, a["out_dtype"])

    with pytest.raises(ValueError, match="at least one expert"):
        call(experts=[])
    with pytest.raises(ValueError, match="weights: got 2 values for 1 experts"):
        call(weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="thresh_keys: got 0 values"):
        call(thresh_keys=[])
    with pytest.raises(ValueError, match="tie_cutoffs: got 2 values"):
        call(tie_cutoffs=[1, 2])
    with pytest.raises(ValueError, match=r"thresh_keys\[0\]: must be a magnitude key"):
        call(thresh_keys=[-2])
    with pytest.raises(ValueError, match=r"thresh_keys\[0\]: must be a magnitude key"):
        call(thresh_keys=[2**31])
    with pytest.raises(ValueError, match=r"weights\[0\]: must be finite"):
        call(weights=[math.inf])
    with pytest.raises(ValueError, match="lambda_: must be finite"):
        call(lambda_=1e39)
    with pytest.raises(ValueError, match="base_ptr: null pointer"):
        call(base=0)
    with pytest.raises(ValueError, match=r"expert_ptrs\[0\]: overlaps the output"):
        call(out_ptr=x.data_ptr() + 4)
    with pytest.raises(ValueError, match="base_ptr: overlaps the output"):
        call(base=out.data_ptr(), out_ptr=out.data_ptr(), out_dtype=1)  # same address, other dtype
    with pytest.raises(ValueError, match="in_dtype: unknown dtype code"):
        call(dtype=3)
    with pytest.raises(ValueError, match="n: element count"):
        call(n=-1)
    call(n=0, base=0, experts=[0], out_ptr=0)  # nothing to do: null pointers are fine with n = 0

    def cut(base=b.data_ptr(), experts=p, n=8, keys=(5,), budgets=(1,)):
        return _C.tie_cutoffs(base, experts, 0, n, list(keys), list(budgets))

    with pytest.raises(ValueError, match="at least one expert"):
        cut(experts=[])
    with pytest.raises(ValueError, match="tie_budgets: got 2 values"):
        cut(budgets=(1, 1))
    with pytest.raises(ValueError, match=r"tie_budgets\[0\]: must be >= 0, or -1"):
        cut(budgets=(-2,))
    with pytest.raises(ValueError, match=r"tie_budgets\[0\]: a tie budget needs a real threshold"):
        cut(keys=(-1,), budgets=(3,))
    with pytest.raises(ValueError, match=r"expert_ptrs\[0\]: null pointer"):
        cut(experts=[0])
    assert cut(n=0, base=0, experts=[0], budgets=(4,)) == ([0], [4])  # no ties in nothing: budget kept
    with pytest.raises(ValueError, match=r"experts\[1\]"):
        _native().ties_tensor(x, [x, torch.zeros(9)], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="densities: got 1 densities for 2 experts"):
        _native().ties_tensor(x, [x, x], [1.0, 1.0], [0.5])
    with pytest.raises(TypeError, match="not supported"):
        _native().ties_tensor(x.double(), [x.double()], [1.0], [0.5])


def task_arithmetic_twin(base, experts, weights, *, lambda_=1.0, normalize=False, out_dtype=None):
    out = merge_tensors("task_arithmetic", [base, *experts], base_index=0,
                        params={"lambda": lambda_, "normalize": normalize},
                        model_params=[{}] + [{"weight": w} for w in weights])
    return out.to(base.dtype if out_dtype is None else out_dtype)


@pytest.mark.parametrize("dtype,k,size", [(torch.float32, 1, 1), (torch.bfloat16, 3, 1023),
                                          (torch.float16, 4, 65537), (torch.bfloat16, 2, 300007)])
def test_without_consensus_is_task_arithmetic(dtype, k, size):
    """consensus=False with nothing trimmed (key -1) is the torch task arithmetic, bit for bit, including the
    vanishing weight sum (|sum w| < 1e-8 divides by 1) and lambda."""
    base, experts, weights = _data(size, k, dtype, seed=size + 17 * k)
    n = base.numel()
    for ws, normalize, lambda_ in ((weights, False, 1.0), (weights, True, 0.6),
                                   ([1.0] * (k - 1) + [1e-9 - (k - 1)], True, 1.0)):
        ref = task_arithmetic_twin(base, experts, ws, lambda_=lambda_, normalize=normalize)
        got = _native().ties_map(base, experts, ws, [-1] * k, [n] * k, lambda_=lambda_, normalize=normalize,
                                 consensus=False)
        assert_bit_equal(got, ref, f"task arithmetic normalize={normalize} lambda={lambda_}")
