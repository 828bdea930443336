"""pymerge._C CUDA kernels (via pymerge.ops.native_cuda): bit-identical to torch's casts and to the CPU
kernels. The GPU tests are marked `gpu` and skip without a usable GPU; the availability checks run
everywhere."""

from __future__ import annotations

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason
from pymerge.errors import BackendUnavailable

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 7, 1023, 65537, 1_000_003]


def _cuda_reason():
    from pymerge.ops import native_cuda

    return native_cuda.cuda_unavailable_reason() if _C is not None else "pymerge._C is not built"


needs_gpu = pytest.mark.skipif(
    _C is None or not torch.cuda.is_available() or _cuda_reason() is not None,
    reason=f"native CUDA kernels cannot run here: {_cuda_reason() if _C is not None else 'no pymerge._C'}",
)


def test_unusable_cuda_is_a_clear_error():
    from pymerge.ops import native_cuda

    reason = native_cuda.cuda_unavailable_reason()
    if reason is None:
        pytest.skip("the native CUDA kernels are usable here")
    with pytest.raises(BackendUnavailable, match="native CUDA cast is unavailable"):
        native_cuda.cast(torch.zeros(3), torch.float16)
    with pytest.raises(BackendUnavailable, match="native CUDA weighted_sum is unavailable"):
        native_cuda.weighted_sum([torch.zeros(3)], [1.0])


def test_cuda_launchers_exist_exactly_when_compiled():
    info = _C.build_info()
    if info["cuda_compiled"]:
        count, error = _C.cuda_device_count()  # must not crash without a driver: it reports instead
        assert isinstance(count, int) and (error is None or isinstance(error, str))
    else:
        assert not hasattr(_C, "cuda_device_count")


def _bits(x):
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int16)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("src", DTYPES)
@pytest.mark.parametrize("dst", DTYPES)
def test_cast_matches_torch_and_cpu(src, dst, size):
    from pymerge.ops import native_cpu, native_cuda

    g = torch.Generator().manual_seed(size)
    x = (torch.randn(size, generator=g) * torch.exp2(torch.randint(-30, 31, (size,), generator=g).float())).to(src)
    got = native_cuda.cast(x.cuda(), dst).cpu()
    ref = x.to(dst)
    finite = ~torch.isnan(ref)
    assert torch.equal(_bits(got)[finite], _bits(ref)[finite])
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(_bits(got), _bits(native_cpu.cast(x, dst)))  # NaNs included: one shared header


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16])
def test_every_16bit_pattern(src):
    from pymerge.ops import native_cpu, native_cuda

    x = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(src)
    for dst in DTYPES:
        assert torch.equal(_bits(native_cuda.cast(x.cuda(), dst).cpu()), _bits(native_cpu.cast(x, dst)))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_weighted_sum_bit_identical_to_cpu(in_dtype, out_dtype, size, normalize):
    from pymerge.ops import native_cpu, native_cuda

    g = torch.Generator().manual_seed(size + 17)
    k = 1 + size % 5
    xs = [torch.randn(size, generator=g).to(in_dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) + 0.1).tolist()
    got = native_cuda.weighted_sum([x.cuda() for x in xs], weights, normalize=normalize, out_dtype=out_dtype)
    want = native_cpu.weighted_sum(xs, weights, normalize=normalize, out_dtype=out_dtype)
    assert torch.equal(_bits(got.cpu()), _bits(want))


@pytest.mark.gpu
@needs_gpu
def test_runs_on_the_current_stream_and_checks_device():
    from pymerge.ops import native_cuda

    x = torch.randn(1 << 20, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = native_cuda.cast(x * 2, torch.bfloat16)  # x * 2 is enqueued on the same side stream
    stream.synchronize()
    assert torch.equal(y.cpu(), (x * 2).to(torch.bfloat16).cpu())
    with pytest.raises(ValueError, match="cuda tensor"):
        native_cuda.cast(torch.zeros(3), torch.float16)
    with pytest.raises(ValueError, match="at most"):
        native_cuda.weighted_sum([x] * 200, [1.0] * 200)


# ---- Exact top-k, TIES, Philox masks, DARE/DELLA: CUDA against the CPU kernels and the torch twins ----

MERGE_SIZES = [1, 7, 65537, 1_000_003]


def _merge_data(n, k, dtype, seed, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:  # long runs of equal magnitudes: thresholds split ties
        base = torch.randint(-2, 3, (n,), generator=g).to(dtype)
        experts = [torch.randint(-4, 5, (n,), generator=g).to(dtype) for _ in range(k)]
    else:
        base = torch.randn(n, generator=g).to(dtype)
        experts = [(base.float() + torch.randn(n, generator=g) * 0.05).to(dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) * 2.0 - 0.6).tolist()
    return base, experts, weights


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("size", MERGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
def test_radix_hist_equals_bincount(size, dtype, with_base):
    from pymerge.ops import native_cuda
    from pymerge.ops.select import magnitude_keys

    base, experts, _ = _merge_data(size, 3, dtype, seed=size)
    b = base if with_base else None
    keys = [magnitude_keys(x.float() - base.float() if with_base else x.float()).reshape(-1).long() for x in experts]
    hist = native_cuda.radix_hist_hi([x.cuda() for x in experts], base=None if b is None else b.cuda()).cpu()
    assert torch.equal(hist, torch.stack([torch.bincount(kk >> 16, minlength=1 << 16) for kk in keys]))
    bins = [int(torch.argmax(hist[j])) for j in range(3)]
    lo = native_cuda.radix_hist_lo([x.cuda() for x in experts], bins, base=None if b is None else b.cuda()).cpu()
    want = torch.stack([torch.bincount(kk[(kk >> 16) == bj] & 0xFFFF, minlength=1 << 16) for kk, bj in zip(keys, bins)])
    assert torch.equal(lo, want)


@pytest.mark.gpu
@needs_gpu
def test_radix_hist_one_hot_bin_past_16_bits():
    # every key in one bin, 3 million of them: the packed 16-bit shared counters must flush before they overflow
    from pymerge.ops import native_cuda

    x = torch.full((3_000_017,), 1.5, dtype=torch.bfloat16, device="cuda")
    hist = native_cuda.radix_hist_hi([x, -x]).cpu()
    key = int(torch.tensor([1.5]).view(torch.int32)) >> 16
    assert int(hist[0, key]) == 3_000_017 and int(hist[1, key]) == 3_000_017 and int(hist.sum()) == 2 * 3_000_017
    lo = native_cuda.radix_hist_lo([x], [key]).cpu()
    assert int(lo[0, 0]) == 3_000_017


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("size", MERGE_SIZES)
def test_tie_cutoffs_match_flat_positions(size):
    from pymerge.ops import native_cuda
    from pymerge.ops.select import magnitude_keys

    base, experts, _ = _merge_data(size, 4, torch.bfloat16, seed=size + 1, integer=True)
    keys, budgets = [], []
    for j, x in enumerate(experts):
        kk = magnitude_keys(x.float() - base.float()).reshape(-1)
        key = int(kk.max()) if j % 2 == 0 else int(kk.min())
        count = int((kk == key).sum())
        keys.append(key)
        budgets.append([max(1, count // 3), count + 5, 0, -1][j])
    got = native_cuda.tie_cutoffs(base.cuda(), [x.cuda() for x in experts], keys, budgets)
    want_cut, want_left = [], []
    for x, key, budget in zip(experts, keys, budgets):
        ties = torch.nonzero(magnitude_keys(x.float() - base.float()).reshape(-1) == key).reshape(-1)
        if budget < 0:
            want_cut.append(size), want_left.append(budget)
        elif budget == 0:
            want_cut.append(-1), want_left.append(0)
        elif budget <= ties.numel():
            want_cut.append(int(ties[budget - 1])), want_left.append(0)
        else:
            want_cut.append(size), want_left.append(budget - ties.numel())
    assert got == (want_cut, want_left)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("size", MERGE_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("consensus", [True, False])
def test_ties_map_bit_identical_to_cpu(size, dtype, consensus):
    from pymerge.ops import native_cpu, native_cuda

    base, experts, weights = _merge_data(size, 1 + size % 5, dtype, seed=size + 2, integer=size % 2 == 1)
    ths = native_cpu.ties_thresholds(base, experts, [0.3, 1.0, 0.5, 1e-4, 0.0][: len(experts)])
    keys = [th.key for th in ths]
    cuts, _ = native_cpu.tie_cutoffs(base, experts, keys, [th.ties for th in ths])
    assert native_cuda.tie_cutoffs(base.cuda(), [x.cuda() for x in experts], keys,
                                   [th.ties for th in ths])[0] == cuts
    for out_dtype in DTYPES:
        for normalize, lam in ((True, 1.0), (False, 0.7)):
            want = native_cpu.ties_map(base, experts, weights, keys, cuts, lambda_=lam, normalize=normalize,
                                       consensus=consensus, out_dtype=out_dtype)
            got = native_cuda.ties_map(base.cuda(), [x.cuda() for x in experts], weights, keys, cuts, lambda_=lam,
                                       normalize=normalize, consensus=consensus, out_dtype=out_dtype).cpu()
            same = (_bits(got) == _bits(want)) | (torch.isnan(got) & torch.isnan(want))
            assert bool(same.all()), f"{int((~same).sum())} elements differ"


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("start", [0, 3, 4 * 2**32 + 1])
@pytest.mark.parametrize("size", MERGE_SIZES)
def test_philox_masks_bit_identical_to_torch(size, start):
    from pymerge.ops import native_cuda
    from pymerge.ops.philox import keep_mask, random_words

    assert torch.equal(native_cuda.philox_uniform24(11, 3, "w", start, size).cpu().long(),
                       random_words(11, 3, "w", start, size) >> 8)
    for prob in (0.0, 0.3, 1.0):
        assert torch.equal(native_cuda.philox_keep_mask(11, 3, "w", start, size, prob).cpu(),
                           keep_mask(11, 3, "w", start, size, prob))
    p = torch.rand(size, generator=torch.Generator().manual_seed(size))
    assert torch.equal(native_cuda.philox_keep_mask(11, 3, "w", start, size, p.cuda()).cpu(),
                       keep_mask(11, 3, "w", start, size, p))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("method,consensus", [("dare_ties", "sum"), ("dare_linear", None), ("della", "sum"),
                                              ("della_linear", None)])
@pytest.mark.parametrize("size", [7, 65537, 1_000_003])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dare_map_matches_torch_twin(method, consensus, size, dtype):
    from pymerge.methods.sparsify import della_probabilities
    from pymerge.ops import merge_tensors, native_cuda
    from pymerge.ops.philox import keep_mask

    base, experts, weights = _merge_data(size, 3, dtype, seed=size + 3)
    densities, ids, seed, name, eps = [0.3, 0.8, 1.0], [5, 1, 2], 42, "layers.1.w", 0.1
    mp = [{"weight": w, "density": d, **({"epsilon": eps} if method.startswith("della") else {})}
          for w, d in zip(weights, densities)]
    want = merge_tensors(method, [base, *experts], base_index=0, params={"rescale": False},
                         model_params=[{}] + mp, seed=seed, name=name, model_ids=[0, *ids]).to(dtype)
    if method.startswith("della"):
        probs = [torch.ones(size).cuda() if d >= 1 else
                 della_probabilities((x.float() - base.float()).reshape(1, size), d, eps, size).reshape(size).cuda()
                 for x, d in zip(experts, densities)]
    else:
        probs = densities
    got = native_cuda.dare_map(base.cuda(), [x.cuda() for x in experts], weights, seed=seed, model_ids=ids,
                               tensor_name=name, probs=probs, consensus=consensus,
                               normalize=method == "della").cpu()
    assert torch.equal(_bits(got), _bits(want))
    # masks alone: base 0, x = 1, weight 1 -> out = keep
    ones = torch.ones(size, device="cuda")
    m = native_cuda.dare_map(torch.zeros(size, device="cuda"), [ones], [1.0], seed=seed, model_ids=[9],
                             tensor_name=name, probs=[0.4], start=5, consensus=None).cpu()
    assert torch.equal(m, keep_mask(seed, 9, name, 5, size, 0.4).float())


@pytest.mark.gpu
@needs_gpu
def test_triton_kernels_bit_identical_to_cuda():
    pytest.importorskip("triton")
    from pymerge.ops import native_cpu, native_cuda
    from pymerge.triton_kernels import dare_map as tdm
    from pymerge.triton_kernels import radix_hist as trh
    from pymerge.triton_kernels import ties_map as ttm

    base, experts, weights = _merge_data(1_000_003, 3, torch.bfloat16, seed=77, integer=True)
    gb, gx = base.cuda(), [x.cuda() for x in experts]
    assert torch.equal(trh.radix_hist_hi(gx, base=gb), native_cuda.radix_hist_hi(gx, base=gb))
    ths = native_cpu.ties_thresholds(base, experts, [0.3, 0.6, 0.05])
    keys = [th.key for th in ths]
    cuts, _ = native_cpu.tie_cutoffs(base, experts, keys, [th.ties for th in ths])
    assert torch.equal(_bits(ttm.ties_map(gb, gx, weights, keys, cuts).cpu()),
                       _bits(native_cuda.ties_map(gb, gx, weights, keys, cuts).cpu()))
    kw = dict(seed=3, model_ids=[1, 2, 3], tensor_name="t", probs=[0.3, 0.6, 0.9], scales=[1.5, 1.0, 0.5],
              start=7, consensus="sum", normalize=True)
    assert torch.equal(_bits(tdm.dare_map(gb, gx, weights, **kw).cpu()),
                       _bits(native_cuda.dare_map(gb, gx, weights, **kw).cpu()))
