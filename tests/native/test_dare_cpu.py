"""pymerge._C DARE/DELLA kernels (via pymerge.ops.native_cpu) against their torch twins, bit for bit.

``dare_map``: the twin is ``pymerge.ops.merge_tensors`` with dare_ties / dare_linear / della / della_linear
(fp32 result, cast with ``.to(out_dtype)``), given the twin's own L1 scales. ``dare_l1_rows``: the twin is
``lane_row_sums`` of |tau| and |tau| * keep_mask. Random data, odd sizes, stream offsets past 2^32,
every element compared (NaN as NaN: payloads are not reproducible).
"""

from __future__ import annotations

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason
from pymerge.methods.sparsify import RESCALE_EPS, della_probabilities
from pymerge.ops import merge_tensors
from pymerge.ops.exact_sum import lane_row_sums
from pymerge.ops.philox import keep_mask

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

METHODS = {"dare_ties": "sum", "dare_linear": None, "della": "sum", "della_linear": None}
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _nc():
    from pymerge.ops import native_cpu

    return native_cpu


def assert_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    g, w = got[~nan].view(_INT_VIEW[got.dtype]), want[~nan].view(_INT_VIEW[want.dtype])
    bad = (g != w).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.numel()} of {g.numel()} elements differ, first at {bad[0].item()}"


def data(rows, cols, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    experts = [(base.float() + torch.randn(rows, cols, generator=g) * 0.05).to(dtype) for _ in range(k)]
    weights = (torch.rand(k, generator=g, dtype=torch.float64) * 2.0 - 0.6).tolist()
    return base, experts, weights


def masks_and_probs(method, base, experts, densities, eps, seed, name, ids, start=0):
    """The twin's keep masks (flat) and the kernel's ``probs`` argument for each expert."""
    n = base.numel()
    rows, cols = base.shape
    masks, probs = [], []
    for x, d, i in zip(experts, densities, ids):
        if d >= 1:
            p = 1.0
        elif method.startswith("della"):
            p = 0.0 if d <= 0 else della_probabilities(x.float() - base.float(), d, eps, cols).contiguous()
        else:
            p = d
        probs.append(p)
        masks.append(keep_mask(seed, i, name, start, n, p).reshape(rows, cols))
    return masks, probs


def twin_scales(base, experts, masks, densities):
    """The twin's L1 rescale: fp64 row sums in eight lanes, combined exactly; skipped below 1e-7."""
    import math

    out = []
    for x, m, d in zip(experts, masks, densities):
        a = (x.float() - base.float()).abs()
        before = math.fsum(lane_row_sums(a).tolist())
        after = math.fsum(lane_row_sums(a * m).tolist())
        out.append(before / after if d < 1 and before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0)
    return out


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dtype,k,rows,cols,densities", [
    (torch.float32, 1, 1, 1, [0.5]),
    (torch.bfloat16, 2, 3, 7, [0.5, 1.0]),
    (torch.float16, 3, 7, 149, [0.3, 0.8, 0.5]),
    (torch.bfloat16, 4, 13, 521, [0.5, 0.2, 1.0, 0.6]),
    (torch.bfloat16, 3, 2, 70001, [0.4, 0.6, 0.85]),  # several parallel blocks of 64K elements
])
@pytest.mark.parametrize("rescale,normalize,lambda_", [(True, None, 1.0), (False, True, 0.8), (True, False, 1.3)])
def test_map_matches_torch_twin(method, dtype, k, rows, cols, densities, rescale, normalize, lambda_):
    nc = _nc()
    base, experts, weights = data(rows, cols, k, dtype, seed=rows * 31 + cols + k)
    seed, name, ids, eps = 99 + cols, "model.layers.0.mlp.weight", [4, 1, 7, 2][:k], 0.1
    params = {"rescale": rescale, "lambda": lambda_}
    if normalize is not None:
        params["normalize"] = normalize
    mparams = [{"weight": w, "density": d, **({"epsilon": eps} if method.startswith("della") else {})}
               for w, d in zip(weights, densities)]
    full = merge_tensors(method, [base, *experts], base_index=0, params=params, model_params=[{}] + mparams,
                         seed=seed, name=name, model_ids=[0, *ids])
    masks, probs = masks_and_probs(method, base, experts, densities, eps, seed, name, ids)
    scales = twin_scales(base, experts, masks, densities) if rescale else [1.0] * k
    norm = normalize if normalize is not None else method == "della"
    for out_dtype in (dtype, torch.float32):
        got = nc.dare_map(base, experts, weights, seed=seed, model_ids=ids, tensor_name=name, probs=probs,
                          scales=scales, consensus=METHODS[method], normalize=norm, lambda_=lambda_,
                          out_dtype=out_dtype)
        assert_bits(got, full.to(out_dtype), f"{method} {dtype}->{out_dtype}")


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_l1_rows_match_lane_twin(method):
    nc = _nc()
    rows, cols, start = 9, 1031, 3 * 2**32 + 5  # a stream offset past 2^32 and not a multiple of 4
    base, experts, _ = data(rows, cols, 3, torch.bfloat16, seed=7)
    densities, seed, name, ids = [0.3, 0.7, 0.5], 11, "w", [5, 6, 8]
    masks, probs = masks_and_probs(method, base, experts, densities, 0.2, seed, name, ids, start=start)
    got = nc.dare_l1_rows(base, experts, seed=seed, model_ids=ids, tensor_name=name, probs=probs, start=start)
    assert got.shape == (3, rows, 2) and got.dtype == torch.float64
    for j, (x, m) in enumerate(zip(experts, masks)):
        a = (x.float() - base.float()).abs()
        want = torch.stack([lane_row_sums(a), lane_row_sums(a * m)], dim=1)
        assert torch.equal(got[j], want), f"expert {j}"
    assert bool((got[:, :, 1] < got[:, :, 0]).all())  # masks dropped something in every row


@pytest.mark.parametrize("cols", [1, 7, 8, 9, 3001])
def test_lane_row_sums_is_the_stated_order(cols):
    # Values spanning 2^-40 .. 2^40: any other summation order rounds differently somewhere.
    g = torch.Generator().manual_seed(cols)
    x = (torch.rand(4, cols, generator=g, dtype=torch.float64) * 2.0 ** torch.randint(-40, 40, (4, cols),
                                                                                          generator=g))
    want = []
    for row in x.tolist():
        lanes = [0.0] * 8
        for c, v in enumerate(row):
            lanes[c % 8] += v
        s = lanes
        want.append(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])))
    assert lane_row_sums(x).tolist() == want
    assert lane_row_sums(torch.empty(2, 0)).tolist() == [0.0, 0.0]


@pytest.mark.parametrize("consensus", ["sum", "count", None])
def test_chunks_at_stream_offsets_equal_the_whole(consensus):
    nc = _nc()
    base, experts, weights = data(1, 3001, 3, torch.bfloat16, seed=11)
    base, experts = base.reshape(-1), [x.reshape(-1) for x in experts]
    kw = dict(seed=5, model_ids=[1, 2, 3], tensor_name="t", probs=[0.3, 0.6, 0.9], scales=[1.5, 1.0, 0.75],
              consensus=consensus, normalize=consensus == "sum")
    whole = nc.dare_map(base, experts, weights, **kw)
    parts = [nc.dare_map(base[a:b].contiguous(), [x[a:b].contiguous() for x in experts], weights, start=a, **kw)
             for a, b in ((0, 5), (5, 1030), (1030, 3001))]
    assert torch.equal(torch.cat(parts).view(torch.int16), whole.view(torch.int16))


def test_count_consensus_and_nan_match_twin():
    nc = _nc()
    base, experts, weights = data(5, 211, 3, torch.float32, seed=4)
    experts[1][2, 17] = float("nan")
    experts[2][0, 3] = float("inf")
    full = merge_tensors("dare_ties", [base, *experts], base_index=0,
                         params={"rescale": False, "consensus_method": "count"},
                         model_params=[{}] + [{"weight": w, "density": 0.5} for w in weights], seed=3, name="c",
                         model_ids=[0, 1, 2, 3])
    got = nc.dare_map(base, experts, weights, seed=3, model_ids=[1, 2, 3], tensor_name="c", probs=[0.5] * 3,
                      consensus="count")
    assert_bits(got, full, "count consensus with NaN/Inf")


_SUBPROCESS = """
import hashlib, torch
from pymerge.ops import native_cpu as nc
g = torch.Generator().manual_seed(2)
base = torch.randn(3, 70001, generator=g).to(torch.bfloat16)
experts = [(base.float() + torch.randn(3, 70001, generator=g) * 0.05).to(torch.bfloat16) for _ in range(2)]
kw = dict(seed=1, model_ids=[1, 2], tensor_name="t", probs=[0.4, 0.7])
out = nc.dare_map(base, experts, [0.7, -0.4], scales=[1.2, 0.9], consensus="sum", **kw)
l1 = nc.dare_l1_rows(base, experts, **kw)
print(hashlib.sha256(out.view(torch.int16).numpy().tobytes() + l1.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("threads", ["1", "3"])
def test_thread_count_does_not_change_the_bits(threads):
    """Blocks (map) and rows (L1 norms) go to the OpenMP threads; the bits must not depend on how many."""
    import os
    import subprocess
    import sys

    def run(env):
        r = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert run(dict(os.environ, OMP_NUM_THREADS=threads)) == run(dict(os.environ, OMP_NUM_THREADS="2"))


def test_argument_errors():
    nc = _nc()
    a = torch.randn(2, 5)
    kw = dict(seed=1, model_ids=[1], tensor_name="t", probs=[0.5])
    with pytest.raises(ValueError, match="consensus"):
        nc.dare_map(a, [a], [1.0], consensus="max", **kw)
    with pytest.raises(ValueError, match="start"):
        nc.dare_map(a, [a], [1.0], start=-1, **kw)
    with pytest.raises(ValueError, match="probs"):
        nc.dare_map(a, [a], [1.0], seed=1, model_ids=[1], tensor_name="t", probs=[torch.ones(3)])
    with pytest.raises(ValueError, match="2 values for 1 experts"):
        nc.dare_map(a, [a], [1.0, 1.0], **kw)
    with pytest.raises(ValueError, match="scales"):
        nc.dare_map(a, [a], [1.0], scales=[float("inf")], **kw)
    with pytest.raises(ValueError, match="rows, cols"):
        nc.dare_l1_rows(a.reshape(-1), [a.reshape(-1)], **kw)


@pytest.mark.parametrize("dtype,rows,cols", [(torch.float32, 1, 1), (torch.bfloat16, 3, 7), (torch.float16, 5, 4099),
                                             (torch.bfloat16, 17, 2053), (torch.float32, 2, 70001)])
def test_della_probs_match_torch_ranks(dtype, rows, cols):
    """Stable per-row ranks (many exact ties: every fifth element equals the base, and bf16 repeats values)."""
    nc = _nc()
    g = torch.Generator().manual_seed(rows * cols)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    x = (base.float() + torch.randn(rows, cols, generator=g) * 0.01).to(dtype)
    x.view(-1)[::5] = base.view(-1)[::5]
    if rows * cols > 10:
        x.view(-1)[3] = float("nan")  # NaN ranks above every number, as its key does in the twin
    for density, eps in ((0.5, 0.15), (0.3, 0.29), (0.9, 0.05)):
        got = nc.della_probs(base, x, density, eps)
        want = della_probabilities(x.float() - base.float(), density, eps, cols)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"{dtype} d={density} eps={eps}"


def test_della_probs_are_a_permutation_of_the_rank_ladder():
    # Independent of the twin: every row holds each value low + span * r / (cols - 1) exactly once, and larger
    # magnitudes get larger probabilities.
    nc = _nc()
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(4, 1001)
    x = torch.randn(4, 1001, generator=g)
    p = nc.della_probs(base, x, 0.4, 0.2).double()
    low, span = float(torch.tensor(0.2, dtype=torch.float32)), float(torch.tensor(0.4, dtype=torch.float32))
    ladder = torch.tensor([low + span * r / 1000 for r in range(1001)], dtype=torch.float64)
    for row in range(4):
        assert torch.allclose(p[row].sort().values, ladder, rtol=0, atol=1e-6)
        order = x[row].abs().argsort()
        assert bool((p[row][order].diff() > 0).all())


def _family_config(tmp_path, method, shapes, seed):
    """A bf16 base + 3 experts of ``shapes`` saved under tmp_path, and a ``method`` config merging them."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    paths = []
    for i in range(4):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({k: (v if i == 0 else v + torch.randn(v.shape, generator=g) * 0.1).to(torch.bfloat16)
                   for k, v in base.items()}, str(d / "model.safetensors"))
        paths.append(d)
    extra = {"epsilon": 0.1} if method == "della" else {}
    return {"merge_method": method, "base_model": str(paths[0]),
            "models": [{"model": str(p), "parameters": {"weight": 0.5, "density": 0.4, **extra}} for p in paths[1:]]}


@pytest.mark.parametrize("method", ["della", "dare_ties"])
def test_whole_merge_with_a_3d_tensor_matches_torch(tmp_path, method):
    """A 3-D tensor's DELLA ranks run along dim 1, which is not a chunk row: the cpu merge ranks it with torch
    ops and must still write the torch backend's bytes (a 2-D tensor beside it takes the native ranks)."""
    import pymerge

    cfg = _family_config(tmp_path, method, {"conv.weight": (5, 7, 3), "proj.weight": (11, 13), "norm.weight": (13,)},
                         seed=9)
    for backend in ("cpu", "torch"):
        pymerge.merge(cfg, tmp_path / backend, backend=backend, seed=2, quiet=True)
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == \
        (tmp_path / "torch" / "model.safetensors").read_bytes()


def test_spare_probability_buffers_are_reused_for_one_shape_only():
    from pymerge.methods.dare_native import _SpareProbs

    spare = _SpareProbs()
    a, b = spare.take((3, 5)), spare.take((3, 5))
    assert a.dtype == torch.float32 and a.data_ptr() != b.data_ptr()
    spare.give([a, 1.0, b])  # floats (dense experts) are not buffers
    assert {spare.take((3, 5)).data_ptr(), spare.take((3, 5)).data_ptr()} == {a.data_ptr(), b.data_ptr()}
    spare.give([a])
    c = spare.take((5, 3))  # another shape: the spare of the old one is dropped, not handed out
    assert c.data_ptr() != a.data_ptr() and spare._free == []
    spare.give([a])
    spare.give([c])  # a buffer of another shape replaces the spares
    assert [t.data_ptr() for t in spare._free] == [c.data_ptr()]


@pytest.mark.parametrize("method", ["dare_ties", "della"])
@pytest.mark.parametrize("k,rows,cols", [(1, 1, 8), (3, 9, 1032), (5, 3, 70000)])  # 5 experts: the staged tile
def test_mask_bits_from_the_l1_pass_are_the_masks_and_give_the_same_map(method, k, rows, cols):
    nc = _nc()
    base, experts, weights = data(rows, cols, k, torch.bfloat16, seed=rows + cols + k)
    densities = [0.3, 0.7, 0.5, 1.0, 0.45][:k]
    seed, name, ids, start = 13, "w", [5, 6, 8, 9, 2][:k], 2**32 + 3 * 8
    masks, probs = masks_and_probs(method, base, experts, densities, 0.2, seed, name, ids, start=start)
    bits = [None if d >= 1 else torch.full((rows * cols // 8,), 0xA5, dtype=torch.uint8) for d in densities]
    norms = nc.dare_l1_rows(base, experts, seed=seed, model_ids=ids, tensor_name=name, probs=probs, start=start,
                            keep_bits=bits)
    assert torch.equal(norms, nc.dare_l1_rows(base, experts, seed=seed, model_ids=ids, tensor_name=name,
                                              probs=probs, start=start))
    for j, (b, m) in enumerate(zip(bits, masks)):
        if b is not None:  # bit e % 8 of byte e // 8 is element e's keep
            unpacked = ((b[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
            assert torch.equal(unpacked.bool(), m.reshape(-1).bool()), f"expert {j}"
    kw = dict(seed=seed, model_ids=ids, tensor_name=name, probs=probs, scales=[1.7, 0.5, 2.0, 1.0, 1.25][:k],
              start=start, consensus=METHODS[method], normalize=method == "della", lambda_=0.9)
    flat = base.reshape(-1), [x.reshape(-1) for x in experts]
    want = nc.dare_map(*flat, weights, **kw)
    assert_bits(nc.dare_map(*flat, weights, keep_bits=bits, **kw), want, f"{method} k={k}")


def test_mask_bit_argument_errors():
    nc = _nc()
    a = torch.randn(2, 12)
    kw = dict(seed=1, model_ids=[1], tensor_name="t", probs=[0.5])
    with pytest.raises(ValueError, match="cols % 8 == 0"):
        nc.dare_l1_rows(a, [a.clone()], keep_bits=[torch.empty(3, dtype=torch.uint8)], **kw)
    b = torch.randn(2, 16)
    with pytest.raises(ValueError, match="keep_bits\\[0\\]: expected a contiguous uint8 tensor of 4 bytes"):
        nc.dare_l1_rows(b, [b.clone()], keep_bits=[torch.empty(5, dtype=torch.uint8)], **kw)
    with pytest.raises(ValueError, match="keep_bits: got 2 values for 1 experts"):
        nc.dare_map(b.reshape(-1), [b.reshape(-1).clone()], [1.0], keep_bits=[None, None], **kw)
    m = nc.require_cpu("test")
    x = torch.randn(16)
    with pytest.raises(ValueError, match="keep_bits_ptrs\\[0\\]: overlaps an input"):
        m.dare_l1_rows(b.data_ptr(), [x.data_ptr()], 0, 1, 16, [0.5], [0], 1, [1], 7, 0,
                       torch.empty(2, dtype=torch.float64).data_ptr(), [x.data_ptr()])


@pytest.mark.parametrize("method", ["dare_ties", "della"])
@pytest.mark.parametrize("max_memory", [None, "6KB"])
def test_whole_merge_keeping_mask_bits_matches_torch(tmp_path, method, max_memory):
    """Rows of a multiple of 8 elements: the L1 pass keeps the masks as bits for the map (the last chunk's only,
    when the budget chunks the tensor); the bytes must be the torch backend's either way."""
    import pymerge
    from pymerge.methods import dare_native

    cfg = _family_config(tmp_path, method, {"proj.weight": (37, 64), "odd.weight": (9, 13)}, seed=4)
    used = []
    real = dare_native.NativeDareMerge.map

    def spy(self, chunk):
        used.append(self._bits is not None and self._bits[0] == chunk.row_start)
        return real(self, chunk)

    dare_native.NativeDareMerge.map = spy
    try:
        pymerge.merge(cfg, tmp_path / "cpu", backend="cpu", seed=2, quiet=True, max_memory=max_memory)
    finally:
        dare_native.NativeDareMerge.map = real
    pymerge.merge(cfg, tmp_path / "torch", backend="torch", seed=2, quiet=True)
    assert any(used) and (max_memory is None or not all(used))  # bits used, and (chunked) not for every chunk
    assert (tmp_path / "cpu" / "model.safetensors").read_bytes() == \
        (tmp_path / "torch" / "model.safetensors").read_bytes()
