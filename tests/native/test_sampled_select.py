"""The sampled top-k selection of the native TIES family (pymerge.ops.native_cpu.MagnitudeTopK): a sampled hi
histogram, one bracket pass, and the plain two histogram passes for whatever the bracket misses.

Kernels against torch references (every bin, every count, the multiset of bracket keys); thresholds against the
torch twin ``TopKSelector`` on data that takes each route (bracket hit, bracket missed high and low, buffer
overflow, bracket refused up front, no sampling), in one chunk and in many; whole merges against the torch
backend's bytes with sampling forced on the small test family.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import pymerge
from pymerge._native import native_module, native_unavailable_reason
from pymerge.ops.select import TopKSelector, magnitude_keys

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

SPAN = 4096  # the sample takes the first SPAN >> shift elements of every SPAN


def _nc():
    from pymerge.ops import native_cpu

    return native_cpu


def _keys(x, base):
    return magnitude_keys(x.float() - base.float()).reshape(-1)


def _gauss(n, dtype, seed, k=3, scales=(0.01, 0.001, 0.05)):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g) * 0.02
    experts = [(b + torch.randn(n, generator=g) * scales[j % len(scales)]).to(dtype) for j in range(k)]
    return b.to(dtype), experts


def _reference(base, experts, ks, src=None):
    src = list(range(len(ks))) if src is None else src
    keys = torch.stack([_keys(experts[s], base) for s in src])
    sel = TopKSelector(list(ks), base.numel())
    sel.add_hi(keys)
    sel.end_hi()
    sel.add_lo(keys)
    return sel.end_lo()


def _assert_same_thresholds(got, want, what=""):
    for j, (a, b) in enumerate(zip(got, want)):
        assert (a.key, a.ties) == (b.key, b.ties), f"{what} selection {j}: {a} != {b}"


def _select(base, experts, ks, *, src=None, chunks=1, shift=None):
    """MagnitudeTopK over ``chunks`` row chunks of the flat tensors (the executor's protocol)."""
    nc = _nc()
    sel = nc.MagnitudeTopK(ks, base.numel(), src, shift=shift)
    bounds = torch.linspace(0, base.numel(), chunks + 1).long().tolist()
    for p in range(sel.passes):
        for a, b in zip(bounds, bounds[1:]):
            sel.add(p, base[a:b], [x[a:b] for x in experts])
        sel.end(p)
    return sel


# ---- kernels -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4095, 4097, 3 * 65536 + 777])
@pytest.mark.parametrize("shift", [1, 3, 4])
def test_sampled_hi_histogram_counts_exactly_the_sample(dtype, n, shift):
    base, experts = _gauss(n, dtype, seed=n + shift)
    got = _nc().radix_hist_hi(experts, base=base, sample_shift=shift)
    sampled = (torch.arange(n) % SPAN) < (SPAN >> shift)
    for j, x in enumerate(experts):
        want = torch.bincount(_keys(x, base)[sampled] >> 16, minlength=1 << 16)
        assert torch.equal(got[j], want), f"expert {j}: {int((got[j] != want).sum())} bins differ"


def test_sampled_hi_histogram_rejects_a_bad_shift():
    base, experts = _gauss(10, torch.float32, seed=1)
    with pytest.raises(ValueError, match="sample_shift"):
        _nc().radix_hist_hi(experts, base=base, sample_shift=16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [5, 65537, 3 * 65536 + 4097])
def test_bracket_counts_and_copies_every_key_inside(dtype, n):
    base, experts = _gauss(n, dtype, seed=n)
    if n > 10:
        experts[0][3] = float("nan")
        experts[2][7] = float("inf")
        experts[1][:50] = base[:50]  # zero task vectors: key 0, at the bottom of a bracket starting at 0
    sels = [0, 1, 2, 0]  # two selections reading expert 0
    keys = [_keys(experts[s], base).long() for s in sels]  # int64: the bracket may end at 2^31
    mids = [int(k.float().median()) for k in keys]
    lo = [max(0, m - (3 << 16)) for m in mids]
    lo[1] = 0
    hi = [min(1 << 31, m + (2 << 16)) for m in mids]
    hi[3] = 1 << 31  # up to and including the NaN keys
    outs = [torch.empty(n + 3, dtype=torch.int32) for _ in sels]
    filled = [0, 2, 0, 0]  # appends after what a previous chunk stored
    got_filled, above, nonfinite = _nc().radix_bracket([experts[s] for s in sels], lo, hi, outs, filled, base=base)
    for j, k in enumerate(keys):
        inside = k[(k >= lo[j]) & (k < hi[j])]
        assert got_filled[j] == filled[j] + inside.numel()
        assert above[j] == int((k >= hi[j]).sum())
        assert nonfinite[j] == int((k >= 0x7F800000).sum())
        stored = outs[j][filled[j]:got_filled[j]]
        assert torch.equal(torch.sort(stored).values, torch.sort(inside.to(torch.int32)).values), f"selection {j}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 65536, 4 * 65536 + 4099])
def test_bracket_spans_hold_each_blocks_keys_in_flat_order(dtype, n):
    nc = _nc()
    block = nc.require_cpu("test").PARALLEL_BLOCK
    base, experts = _gauss(n, dtype, seed=n + 1)
    sels = [0, 2, 0]
    keys = [_keys(experts[s], base).long() for s in sels]
    lo = [max(0, int(k.float().median()) - (2 << 16)) for k in keys]
    hi = [lo[0] + (4 << 16), lo[1] + (1 << 16), 1 << 31]
    filled = [0, 5, 0]
    outs = [torch.full((n + 8,), -1, dtype=torch.int32) for _ in sels]
    spans = torch.full((len(sels), nc.bracket_blocks(n), 2), -7, dtype=torch.int64)
    got, _, _ = nc.radix_bracket([experts[s] for s in sels], lo, hi, outs, filled, base=base, spans=spans)
    for j, k in enumerate(keys):
        covered = torch.zeros(n + 8, dtype=torch.bool)
        for b in range(spans.shape[1]):
            blk = k[b * block:(b + 1) * block]
            want = blk[(blk >= lo[j]) & (blk < hi[j])].to(torch.int32)
            at, count = spans[j, b].tolist()
            assert count == want.numel(), (j, b)
            if count:
                assert torch.equal(outs[j][at:at + count], want), (j, b)  # flat order inside the block
                assert not covered[at:at + count].any()
                covered[at:at + count] = True
        assert int(covered.sum()) == got[j] - filled[j] and not covered[:filled[j]].any()


def test_bracket_spans_are_checked():
    nc = _nc()
    x, base = torch.randn(70000), torch.randn(70000)
    out = torch.empty(100, dtype=torch.int32)
    with pytest.raises(ValueError, match="spans: expected a contiguous int64 tensor of shape \\(1, 2, 2\\)"):
        nc.radix_bracket([x], [0], [10], [out], [0], base=base, spans=torch.empty(1, 1, 2, dtype=torch.int64))
    m = nc.require_cpu("test")
    args = dict(x_ptrs=[x.data_ptr()], dtype=0, n=70000, lo_keys=[0], hi_keys=[10], out_ptrs=[out.data_ptr()],
                capacities=[100], filled=[0], base_ptr=base.data_ptr())
    with pytest.raises(ValueError, match="span_ptrs: got 2 values"):
        m.radix_bracket(**args, span_ptrs=[1, 2])
    with pytest.raises(ValueError, match="span_ptrs\\[0\\]: overlaps out_ptrs\\[0\\]"):
        m.radix_bracket(**args, span_ptrs=[out.data_ptr()])


def test_bracket_reports_overflow_and_stores_only_what_fits():
    n = 3 * 65536
    base, experts = _gauss(n, torch.float32, seed=5)
    k = _keys(experts[0], base)
    lo, hi = int(k.min()), int(k.max()) + 1  # every key inside
    out = torch.full((1000,), -1, dtype=torch.int32)
    guard = torch.full((10,), -7, dtype=torch.int32)
    filled, above, _ = _nc().radix_bracket([experts[0]], [lo], [hi], [out[:990]], [0], base=base)
    assert filled == [n] and above == [0]
    assert bool((out[:990] >= lo).all()) and torch.equal(out[990:], torch.full((10,), -1, dtype=torch.int32))
    assert torch.equal(guard, torch.full((10,), -7, dtype=torch.int32))


def test_bracket_multiset_is_the_same_for_any_thread_count():
    """OpenMP's thread count is fixed at process start: one subprocess per count."""
    import os
    import subprocess
    import sys

    code = ("import torch, sys; from pymerge.ops import native_cpu as nc;"
            "g = torch.Generator().manual_seed(3); b = torch.randn(500000, generator=g);"
            "x = b + torch.randn(500000, generator=g);"
            "o = torch.empty(500000, dtype=torch.int32);"
            "f, a, _ = nc.radix_bracket([x], [1060000000], [1070000000], [o], [0], base=b);"
            "s = torch.sort(o[:f[0]]).values;"
            "print(f[0], a[0], int(s.double().sum()), int((s * torch.arange(f[0], dtype=torch.int32)).double().sum()))")
    outs = set()
    for threads in ("1", "2", "3"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                text=True).stdout)
    assert len(outs) == 1, outs


# ---- thresholds --------------------------------------------------------------------------------------------

@pytest.fixture
def sample_small(monkeypatch):
    """Sample tensors from 16K elements on (the default starts at 2M), at shift 4 from 64K."""
    nc = _nc()
    monkeypatch.setattr(nc, "SAMPLE_MIN", 1 << 14)
    monkeypatch.setattr(nc, "SAMPLE_LOG2", 12)
    return nc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunks", [1, 7])
def test_bracket_hits_on_gaussian_task_vectors(dtype, chunks, sample_small):
    n = 5 * 65536 + 333
    base, experts = _gauss(n, dtype, seed=11, k=4)
    densities = [0.2, 0.5, 0.9, 0.05]
    ks = [sample_small.topk_count(d, n) for d in densities]
    sel = _select(base, experts, ks, chunks=chunks)
    assert sel.shift == 4 and sel.missed == []  # the one-pass route, not the fallback
    _assert_same_thresholds(sel.result, _reference(base, experts, ks))


def test_default_settings_sample_large_tensors_and_hit():
    n = 1 << 22
    nc = _nc()
    base, experts = _gauss(n, torch.bfloat16, seed=2)
    ks = [nc.topk_count(d, n) for d in (0.3, 0.6, 0.9)]
    sel = _select(base, experts, ks)
    assert sel.shift == 2 and sel.missed == []
    _assert_same_thresholds(sel.result, _reference(base, experts, ks))


def _biased_sample(n, seed, sampled_scale):
    """Task vectors whose sampled positions (the first 256 of every 4096) are scaled: the sample misjudges the
    k-th key, so a tight bracket misses (high when sampled_scale > 1, low when < 1)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    tau = torch.randn(3, n, generator=g) * 0.01
    tau[:, (torch.arange(n) % SPAN) < (SPAN >> 4)] *= sampled_scale
    return base, [base + t for t in tau]


@pytest.mark.parametrize("sampled_scale", [4.0, 0.25])
@pytest.mark.parametrize("chunks", [1, 5])
def test_missed_bracket_falls_back_to_the_exact_passes(sampled_scale, chunks, sample_small, monkeypatch):
    monkeypatch.setattr(sample_small, "BRACKET_SIGMAS", 0.0)
    monkeypatch.setattr(sample_small, "BRACKET_SLACK", 0)
    n = 4 * 65536 + 99
    base, experts = _biased_sample(n, seed=3, sampled_scale=sampled_scale)
    ks = [sample_small.topk_count(d, n) for d in (0.3, 0.5, 0.7)]
    sel = _select(base, experts, ks, chunks=chunks)
    assert sel.missed == [0, 1, 2]
    _assert_same_thresholds(sel.result, _reference(base, experts, ks))


def test_overflowing_buffer_falls_back(sample_small, monkeypatch):
    monkeypatch.setattr(sample_small, "CANDIDATE_HEADROOM", 0.01)
    n = 3 * 65536
    base, experts = _gauss(n, torch.bfloat16, seed=4)
    ks = [sample_small.topk_count(0.4, n)] * 3
    sel = _select(base, experts, ks, chunks=3)
    assert sel.missed == [0, 1, 2]
    _assert_same_thresholds(sel.result, _reference(base, experts, ks))


def test_bracket_refused_up_front_takes_the_exact_passes(sample_small, monkeypatch):
    n = 3 * 65536
    base, experts = _gauss(n, torch.float32, seed=6)
    # density so small that the bracket would reach past the sample's largest key, and a cap that refuses
    ks = [3, sample_small.topk_count(0.5, n), n - 2]
    monkeypatch.setattr(sample_small, "CANDIDATE_CAP", 10_000)
    sel = _select(base, experts, ks, chunks=2)
    assert sel.missed == [0, 1, 2]
    _assert_same_thresholds(sel.result, _reference(base, experts, ks))


def test_breadcrumb_pairs_on_one_expert(sample_small):
    n = 2 * 65536 + 5
    base, experts = _gauss(n, torch.bfloat16, seed=8, k=2)
    ks = [sample_small.topk_count(0.9, n), sample_small.topk_count(0.05, n), sample_small.topk_count(0.6, n),
          sample_small.topk_count(0.01, n)]
    src = [0, 0, 1, 1]
    sel = _select(base, experts, ks, src=src, chunks=4)
    _assert_same_thresholds(sel.result, _reference(base, experts, ks, src))


def test_few_distinct_magnitudes_and_tie_flags(sample_small):
    n = 3 * 65536 + 17
    g = torch.Generator().manual_seed(9)
    base = torch.zeros(n, dtype=torch.bfloat16)
    experts = [torch.randint(-3, 4, (n,), generator=g).to(torch.bfloat16) for _ in range(3)]
    ks = [sample_small.topk_count(d, n) for d in (0.3, 0.5, 0.8)]
    sel = _select(base, experts, ks, chunks=3)
    want = _reference(base, experts, ks)
    _assert_same_thresholds(sel.result, want)
    for j, (got, w) in enumerate(zip(sel.result, want)):
        equal = int((_keys(experts[j], base) == got.key).sum())
        assert got.keep_all_ties == (got.ties == equal), j


@pytest.mark.parametrize("route", ["bracket", "fallback"])
def test_nonfinite_task_vectors_are_counted(route, sample_small, monkeypatch):
    if route == "fallback":
        monkeypatch.setattr(sample_small, "CANDIDATE_CAP", 1)
    n = 2 * 65536
    base, experts = _gauss(n, torch.float32, seed=10)
    experts[1][12345] = float("nan")
    ks = [sample_small.topk_count(0.5, n)] * 3
    sel = _select(base, experts, ks, chunks=2)
    assert (sel.missed == [0, 1, 2]) == (route == "fallback")
    assert sel.nonfinite >= 1
    _assert_same_thresholds(sel.result, _reference(base, experts, ks))


# ---- whole merges ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_whole_merge_with_sampling_writes_the_torch_backends_bytes(method, tiny_family, tmp_path, sample_small,
                                                                    monkeypatch):
    monkeypatch.setattr(sample_small, "SAMPLE_MIN", 1 << 10)
    monkeypatch.setattr(sample_small, "SAMPLE_LOG2", 8)
    params = {"weight": 0.7, "density": 0.45}
    if method == "breadcrumbs_ties":
        params.update(density=0.8, gamma=0.05)
    cfg = {"merge_method": method, "base_model": str(tiny_family.base),
           "models": [{"model": str(p), "parameters": dict(params)} for p in tiny_family.experts]}
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = {}
    for backend, budget in (("torch", None), ("cpu", None), ("cpu", 200_000)):
        d = tmp_path / f"{backend}-{budget}"
        pymerge.merge(path, d, backend=backend, max_memory=budget, seed=1, quiet=True)
        out[(backend, budget)] = {p.name: p.read_bytes() for p in d.iterdir()}
    want = out[("torch", None)]
    for key, files in out.items():
        assert files.keys() == want.keys()
        for name in want:
            assert files[name] == want[name], (key, name)


def test_bracket_binding_rejects_bad_arguments():
    from pymerge._native import cpu_module

    m = cpu_module()
    x = torch.randn(100)
    base = torch.randn(100)
    out = torch.empty(50, dtype=torch.int32)
    f32 = 0  # DTYPE_F32
    good = dict(x_ptrs=[x.data_ptr()], dtype=f32, n=100, lo_keys=[0], hi_keys=[1 << 30], out_ptrs=[out.data_ptr()],
                capacities=[50], filled=[0], base_ptr=base.data_ptr())
    filled, above, nonfinite = m.radix_bracket(**good)
    assert filled[0] + above[0] == 100 and nonfinite == [0]
    bad = [
        (dict(lo_keys=[0, 1]), "lo_keys: got 2 values"),
        (dict(lo_keys=[5], hi_keys=[4]), "need 0 <= lo <= hi <= 2\\^31"),
        (dict(hi_keys=[(1 << 31) + 1]), "need 0 <= lo <= hi"),
        (dict(capacities=[-1]), "capacities\\[0\\]: must be >= 0"),
        (dict(filled=[-3]), "filled\\[0\\]: must be >= 0"),
        (dict(out_ptrs=[out.data_ptr() + 2]), "4-byte aligned"),
        (dict(out_ptrs=[x.data_ptr()], capacities=[10]), "x_ptrs\\[0\\]: overlaps out_ptrs\\[0\\]"),
        (dict(base_ptr=out.data_ptr() - 8), "base_ptr: overlaps out_ptrs\\[0\\]"),
        (dict(x_ptrs=[]), "at least one input"),
        (dict(dtype=7), "unknown dtype code 7"),
        (dict(n=-1), "element count must be >= 0"),
    ]
    for change, message in bad:
        args = dict(good, **change)
        if "x_ptrs" in change:
            args.update(lo_keys=[], hi_keys=[], out_ptrs=[], capacities=[], filled=[])
        with pytest.raises(ValueError, match=message):
            m.radix_bracket(**args)


# ---- tie cutoffs -------------------------------------------------------------------------------------------

def _kept_mask(keys, key, ties):
    """The oracle: keys > key, plus the first ``ties`` keys == key in flat order."""
    equal = keys == key
    return (keys > key) | (equal & (torch.cumsum(equal.long(), 0) <= ties))


def _masks_from_cutoffs(scan, base, xs, keys, bounds):
    """Each selection's kept mask from ``scan``'s cutoffs, asked chunk by chunk as the map pass does."""
    parts = [[] for _ in xs]
    for a, b in zip(bounds, bounds[1:]):
        cuts = scan.cutoffs(base[a:b], [x[a:b] for x in xs], a)
        idx = torch.arange(b - a)
        for j, (k, key) in enumerate(zip(keys, scan.keys)):
            parts[j].append((k[a:b] > key) | ((k[a:b] == key) & (idx <= cuts[j])))
    return [torch.cat(p) for p in parts]


@pytest.mark.parametrize("seed", range(6))
def test_tie_scan_keeps_the_oracles_ties_for_any_start_and_chunking(seed):
    nc = _nc()
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 300_000, (1,), generator=g))
    base = torch.zeros(n, dtype=torch.bfloat16)
    x = torch.randint(-2, 3, (n,), generator=g).to(torch.bfloat16)
    keys = _keys(x, base)
    key = int(magnitude_keys(torch.tensor([1.0])))
    positions = torch.nonzero(keys == key).reshape(-1)
    total = positions.numel()
    bounds = sorted({0, n, *torch.randint(0, n + 1, (int(torch.randint(0, 6, (1,), generator=g)),),
                                          generator=g).tolist()})
    cases = [(0, -1), (0, 0), (0, total), (0, max(total // 3, 1))]
    if total:
        r = int(torch.randint(0, total, (1,), generator=g))
        start = int(positions[r]) - int(torch.randint(0, 40, (1,), generator=g))
        cases.append((max(start, 0), total - int((positions < max(start, 0)).sum())))
        cases.append((max(start, 0), 1))
    for start, budget in cases:
        scan = nc.TieScan([key], [budget], [start])
        (got,) = _masks_from_cutoffs(scan, base, [x], [keys], bounds)
        before = int((positions < start).sum())
        want = _kept_mask(keys, key, total if budget < 0 else before + budget)
        assert torch.equal(got, want), (n, bounds, start, budget)


@pytest.mark.parametrize("chunks,map_chunks", [(1, 1), (3, 1), (1, 4), (5, 3)])
def test_tie_scan_from_the_bracket_matches_the_torch_selection(chunks, map_chunks, sample_small):
    """bf16 task vectors with few distinct magnitudes: the k-th key has ties in many blocks, and the kept ones
    run out in a block past the first, so the scan starts there."""
    n = 6 * 65536 + 1234
    g = torch.Generator().manual_seed(12)
    base = torch.zeros(n, dtype=torch.bfloat16)
    experts = [(torch.randint(-40, 41, (n,), generator=g) / 8).to(torch.bfloat16) for _ in range(3)]
    ks = [sample_small.topk_count(d, n) for d in (0.3, 0.55, 0.8)]
    sel = _select(base, experts, ks, chunks=chunks)
    want = _reference(base, experts, ks)
    _assert_same_thresholds(sel.result, want)
    assert sel.missed == [] and sorted(sel._tie_blocks) == [0, 1, 2]
    assert any(start > 0 for start, _ in sel._tie_blocks.values())  # the scan skips the leading blocks
    scan = sel.tie_scan()
    bounds = torch.linspace(0, n, map_chunks + 1).long().tolist()
    keys = [_keys(x, base) for x in experts]
    got = _masks_from_cutoffs(scan, base, experts, keys, bounds)
    for j, (k, mask) in enumerate(zip(keys, got)):
        assert torch.equal(mask, _kept_mask(k, want[j].key, want[j].ties)), j
