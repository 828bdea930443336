"""The streaming GPU executor without a GPU: the budget -> chunk plan arithmetic, the pass/chunk order, the
staging splits, and whole tensors merged through it on CPU tensors with the torch twins of the fused kernels
and a tiny budget, compared bit for bit with the torch methods (``merge_tensors``). The GPU-marked tests at the
end run the same merges on CUDA with the native and Triton kernels and check the memory budget."""

from __future__ import annotations

import pytest
import torch

from pymerge.errors import BackendUnavailable, MergeError
from pymerge.gpu.fused import fused_merge
from pymerge.gpu.kernels import get_kernels
from pymerge.gpu.plan import Footprint, plan_chunks, schedule, staging_rows
from pymerge.gpu.streaming import StreamingExecutor, merge_tensors_gpu
from pymerge.methods import TensorJob, get_method
from pymerge.ops import merge_tensors


def fp(rows=100, row_numel=10, n_inputs=3, **kw):
    return Footprint("t", rows, row_numel, n_inputs, 2, 2, **kw)


def test_resident_when_it_fits_with_one_buffer():
    f = fp(scratch_per_element=4, fixed_bytes=1000)
    whole = 1000 + 100 * 10 * (3 * 2 + 2 + 4)
    plan = plan_chunks(f, whole)
    assert plan.resident and plan.chunks == ((0, 100),) and plan.device_bytes == whole and plan.buffers == 1


def test_chunked_plan_uses_two_buffers_and_covers_every_row_once():
    f = fp(rows=101, scratch_per_element=4, fixed_bytes=1000)
    per_row = 10 * (2 * (3 * 2 + 2) + 4)
    for budget in (1000 + per_row, 1000 + 7 * per_row + 5, 1000 + 60 * per_row):  # resident needs 13120
        plan = plan_chunks(f, budget)
        assert not plan.resident and plan.buffers == 2
        assert plan.device_bytes <= budget
        assert plan.rows_per_chunk == (budget - 1000) // per_row
        rows = [r for a, b in plan.chunks for r in range(a, b)]
        assert rows == list(range(101))
        assert all(b - a == plan.rows_per_chunk for a, b in plan.chunks[:-1])


def test_large_allocations_are_counted_with_the_allocator_slack():
    # 2 GiB of bf16 embedding rows (8192 columns, base + 2 experts), TIES's 1 MiB of histograms: each buffer
    # over 1 MiB is counted 1 MiB larger, and the plan still keeps to the budget
    f = Footprint("embed", 128256, 8192, 3, 2, 2, scratch_per_element=0.002, fixed_bytes=2 * 65536 * 8 + 560)
    budget = 2 << 30
    plan = plan_chunks(f, budget)
    rows = plan.rows_per_chunk
    buffers = 2 * (rows * 8192 * 3 * 2 + (1 << 20)) + 2 * (rows * 8192 * 2 + (1 << 20))
    want = (f.fixed_bytes + (1 << 20)) + buffers + int(rows * 8192 * 0.002)
    assert plan.device_bytes == want <= budget
    assert f.device_bytes(rows + 1, 2) > budget  # the largest chunk that fits
    bare = plan_chunks(f, budget, allocator_slack=False)  # the CPU "device" of the tests: no allocator slack
    assert bare.rows_per_chunk == (budget - f.fixed_bytes) // f.bytes_per_row(2) > rows
    r = bare.rows_per_chunk
    assert bare.device_bytes == f.fixed_bytes + r * 8192 * 16 + int(r * 8192 * 0.002)


@pytest.mark.parametrize("seed", range(20))
def test_the_plan_is_the_largest_chunk_under_the_budget_with_the_slack(seed):
    # the slack is a step (a buffer passing 1 MiB): the chunk is still the largest that fits, never none when
    # small chunks fit (seen: a 31.8 MiB budget refused for want of 28.8 MiB before the search was exact)
    g = torch.Generator().manual_seed(seed)
    rows, cols = int(torch.randint(1, 5000, (1,), generator=g)), int(torch.randint(1, 3000, (1,), generator=g))
    f = Footprint("t", rows, cols, 4, 2, 2, scratch_per_element=float(torch.randint(0, 200, (1,), generator=g)),
                  fixed_bytes=int(torch.randint(0, 30 << 20, (1,), generator=g)))
    budget = f.fixed_bytes + int(torch.randint(1, 64 << 20, (1,), generator=g))
    if f.device_bytes(1, 2) > budget:
        with pytest.raises(MergeError, match="one row needs"):
            plan_chunks(f, budget)
        return
    plan = plan_chunks(f, budget)
    assert plan.device_bytes <= budget
    if not plan.resident:
        r = plan.rows_per_chunk
        assert plan.device_bytes == f.device_bytes(r, 2) and (r == rows or f.device_bytes(r + 1, 2) > budget)


def test_a_row_that_cannot_fit_is_a_clear_error():
    with pytest.raises(MergeError, match="tensor 't'.*--max-gpu-memory"):
        plan_chunks(fp(fixed_bytes=1000), 1000 + 10 * 2 * 8 - 1)


def test_schedule_is_every_pass_in_row_order_and_uploads_a_resident_tensor_once():
    chunked = plan_chunks(fp(rows=10), 3 * 10 * 16)  # 3 rows per chunk (two buffers of 16 bytes per element)
    steps = schedule(chunked, 2)
    assert [(s.p, s.a) for s in steps] == [(p, a) for p in range(3) for a in (0, 3, 6, 9)]
    assert all(s.load for s in steps)
    assert steps[-1].is_map(2) and not steps[0].is_map(2)
    resident = plan_chunks(fp(rows=10), 10**9)
    assert [s.load for s in schedule(resident, 2)] == [True, False, False]


def test_staging_rows():
    assert staging_rows(100, 1000, 50) == 10
    assert staging_rows(100, 50, 50) == 1  # a row larger than a slot still moves, one at a time
    assert staging_rows(100, 10**9, 7) == 7


# ---- whole tensors through the executor (torch twins of the kernels, CPU tensors) ----

def make_job(method, shape, model_params, params=None, seed=0, name="model.layers.0.w", model_ids=None):
    """A TensorJob with the method's defaults filled in, as pymerge.ops.merge_tensors builds it."""
    m = get_method(method)
    params = dict(params or {})
    mps = [dict(p) for p in model_params]
    for spec in m.spec.params:
        if spec.per_model:
            for i, p in enumerate(mps):
                if i != 0 and p.get(spec.name) is None:
                    p[spec.name] = spec.default
        elif params.get(spec.name) is None:
            params[spec.name] = spec.default
    n = len(model_params)
    return TensorJob(name=name, shape=tuple(shape), inputs=[f"m{i}" for i in range(n)], base_index=0,
                     params=params, model_params=mps, model_ids=model_ids or list(range(n)), seed=seed)


def data(shape, k, dtype, seed, integer=False):
    g = torch.Generator().manual_seed(seed)
    if integer:
        base = torch.randint(-2, 3, shape, generator=g).to(dtype)
        return [base] + [torch.randint(-4, 5, shape, generator=g).to(dtype) for _ in range(k)]
    base = torch.randn(shape, generator=g).to(dtype)
    return [base] + [(base.float() + torch.randn(shape, generator=g) * 0.05).to(dtype) for _ in range(k)]


CASES = [  # method, model params (after the base), tensor params, integer data
    ("ties", [{"weight": 0.7, "density": 0.3}, {"weight": -0.2, "density": 0.6}, {"weight": 0.5, "density": 1.0}],
     {}, True),
    ("ties", [{"weight": 1.0, "density": 0.05}, {"weight": 0.4, "density": 0.0}], {"lambda": 0.8}, False),
    ("dare_ties", [{"weight": 0.6, "density": 0.4}, {"weight": 0.3, "density": 0.7}], {}, False),
    ("dare_linear", [{"weight": 0.6, "density": 0.4}, {"weight": 0.3, "density": 1.0}], {"lambda": 1.2}, False),
    ("della", [{"weight": 0.6, "density": 0.5, "epsilon": 0.1}, {"weight": 0.3, "density": 0.7}], {}, False),
    ("della_linear", [{"weight": 0.6, "density": 0.5}, {"weight": 0.3, "density": 0.4}], {}, False),
    ("task_arithmetic", [{"weight": 0.6}, {"weight": -0.3}], {"normalize": True}, False),
]


def twin(method, tensors, model_params, params, seed, name, out_dtype):
    return merge_tensors(method, tensors, base_index=0, params=params, model_params=[{}] + model_params,
                         seed=seed, name=name).to(out_dtype)


@pytest.mark.parametrize("method,mps,params,integer", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("budget_rows", [None, 1, 4])  # resident, one row per chunk, four rows per chunk
def test_chunked_merges_equal_the_torch_methods(method, mps, params, integer, budget_rows):
    shape, dtype = (13, 37), torch.bfloat16
    tensors = data(shape, len(mps), dtype, seed=len(method) * 7 + len(mps), integer=integer)
    job = make_job(method, shape, [{}] + mps, params, seed=5, name="layers.3.mlp.weight")
    kernels = get_kernels("torch")
    merge = fused_merge(method, job, kernels)
    f = Footprint("t", 13, 37, len(tensors), 2, 2, merge.scratch_per_element, merge.fixed_bytes)
    budget = 10**9 if budget_rows is None else f.fixed_bytes + budget_rows * f.bytes_per_row(2)
    engine = StreamingExecutor("cpu", budget, staging_bytes=3 * 37 * 2 * len(tensors))  # ~3 rows per staging copy
    got = merge_tensors_gpu(method, job, tensors, dtype, engine, kernels)
    want = twin(method, tensors, mps, params, 5, "layers.3.mlp.weight", dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    maps = [t for t in engine.stats.trace if t[0] == "map"]
    assert [(a, b) for _, _, a, b in maps] == list(
        (a, min(a + (budget_rows or 13), 13)) for a in range(0, 13, budget_rows or 13))
    uploads = [t for t in engine.stats.trace if t[0] == "upload"]
    passes = merge.reduce_passes + 1
    assert len(uploads) == (1 if budget_rows is None else passes * len(maps))
    assert engine.stats.bytes_downloaded == 13 * 37 * 2


def test_mixed_input_dtypes_are_widened_and_the_output_dtype_is_honoured():
    tensors = data((9, 11), 2, torch.float32, seed=3)
    tensors[1] = tensors[1].to(torch.float16)
    mps = [{"weight": 0.5, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    job = make_job("ties", (9, 11), [{}] + mps)
    kernels = get_kernels("torch")
    engine = StreamingExecutor("cpu", 2 * 65536 * 8 + 2 * 11 * 2 * (3 * 4 + 2))  # histograms + 2 rows per chunk
    got = merge_tensors_gpu("ties", job, tensors, torch.bfloat16, engine, kernels)
    assert engine.stats.chunked_tensors == 1
    want = merge_tensors("ties", tensors, base_index=0, model_params=[{}] + mps, name=job.name).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_unsupported_settings_are_clear_errors():
    kernels = get_kernels("torch")
    with pytest.raises(BackendUnavailable, match="no GPU implementation"):
        fused_merge("slerp", make_job("slerp", (3, 3), [{}, {}], {"t": 0.5}), kernels)
    job = make_job("ties", (3, 3), [{}, {"weight": 1.0}], {"trim_scope": "global"})
    with pytest.raises(BackendUnavailable, match="trim_scope"):
        fused_merge("ties", job, kernels)


# ---- with a GPU ----

def _gpu_reason():
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    from pymerge.ops import native_cuda

    return native_cuda.cuda_unavailable_reason()


needs_gpu = pytest.mark.skipif(_gpu_reason() is not None, reason=f"needs a usable CUDA GPU: {_gpu_reason()}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("method,mps,params,integer", CASES, ids=[f"{c[0]}{i}" for i, c in enumerate(CASES)])
def test_gpu_merges_equal_the_cpu_backend(backend, method, mps, params, integer):
    if backend == "triton":
        pytest.importorskip("triton")
    shape, dtype = (1031, 517), torch.bfloat16
    tensors = data(shape, len(mps), dtype, seed=11, integer=integer)
    job = make_job(method, shape, [{}] + mps, params, seed=9)
    kernels = get_kernels(backend)
    want = twin(method, tensors, mps, params, 9, job.name, dtype)
    # resident, then chunked: 4 MiB of chunk buffers, plus what the kernel set needs whatever the chunk size
    fixed = len(mps) * 65536 * 8 + kernels.ties_scratch(len(mps), job.numel)[1] if method == "ties" else 0
    for budget in (1 << 30, (4 << 20) + fixed):
        got = merge_tensors_gpu(method, job, tensors, dtype, StreamingExecutor("cuda", budget), kernels)
        # every bit, DARE/DELLA included: the L1 rescale sums are taken in the CPU's lane order (Triton kernel)
        diff = got.view(torch.int16) != want.view(torch.int16)
        assert not bool(diff.any()), f"{int(diff.sum())} of {want.numel()} elements differ"


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_embedding_merges_under_a_2gib_budget():
    rows, cols, dtype = 128256, 8192, torch.bfloat16
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g).to(dtype)
    experts = [(base.float() + torch.randn(rows, cols, generator=g) * 0.01).to(dtype) for _ in range(2)]
    mps = [{"weight": 0.5, "density": 0.3}, {"weight": 0.5, "density": 0.3}]
    job = make_job("ties", (rows, cols), [{}] + mps, name="model.embed_tokens.weight")
    budget = 2 << 30
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    engine = StreamingExecutor("cuda", budget)
    got = merge_tensors_gpu("ties", job, [base, *experts], dtype, engine, get_kernels("cuda"))
    assert torch.cuda.max_memory_allocated() - before <= budget
    assert engine.stats.chunked_tensors == 1
    from pymerge.ops import native_cpu

    want = native_cpu.ties_tensor(base.reshape(-1), [e.reshape(-1) for e in experts], [0.5, 0.5], [0.3, 0.3])
    assert torch.equal(got.reshape(-1).view(torch.int16), want.view(torch.int16))
