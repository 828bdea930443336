"""The executor's GPU path (``execute(..., gpu=(engine, kernels))``, what ``--device cuda`` runs) driven on the CPU:
the streaming executor on device "cpu" with the torch kernels must write the same tensors as the CPU merge, for
any device budget, including budgets that force row chunks; a NaN input is refused as on the CPU path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.config import load_config
from pymerge.errors import MergeError
from pymerge.executor import execute
from pymerge.gpu.kernels import get_kernels
from pymerge.gpu.streaming import StreamingExecutor
from pymerge.io.safetensors_writer import ShardedWriter
from pymerge.plan import build_plan

PARAMS = {
    "ties": {"weight": 0.8, "density": 0.35},
    "dare_ties": {"weight": 0.8, "density": 0.5},
    "della_linear": {"weight": 0.8, "density": 0.5, "epsilon": 0.1},
    "task_arithmetic": {"weight": 0.6},
}


def _config(method, family):
    return {"merge_method": method, "base_model": str(family.base), "dtype": "bfloat16",
            "models": [{"model": str(e), "parameters": dict(PARAMS[method])} for e in family.experts]}


def _gpu_path(cfg, out_dir, budget, seed=3):
    plan = build_plan(load_config(cfg), seed=seed)
    try:
        engine = StreamingExecutor("cpu", budget)
        writer = ShardedWriter(out_dir, plan.shards)
        stats = execute(plan, writer, max_memory=1 << 30, progress=False, gpu=(engine, get_kernels("torch")))
        writer.close()
        return stats
    finally:
        plan.close()


@pytest.mark.parametrize("method", sorted(PARAMS))
@pytest.mark.parametrize("chunked", [False, True], ids=["resident", "chunked"])
def test_gpu_path_writes_the_cpu_merge(tmp_path, tiny_family, method, chunked):
    # ties holds 3 x 65,536 int64 histogram bins on the device besides the rows; 24 KiB of rows is less than the
    # tiny family's largest tensor (embeddings: 4 inputs x 131 x 40 bf16 = 42 KB), so that one streams
    budget = (3 * 65536 * 8 if method == "ties" else 0) + 24 * 1024 if chunked else 1 << 30
    cfg = _config(method, tiny_family)
    ref = pymerge.merge(cfg, tmp_path / "ref", quiet=True, seed=3, backend="torch")
    (tmp_path / "gpu").mkdir()
    stats = _gpu_path(cfg, tmp_path / "gpu", budget)
    assert stats.tensors == ref.tensors and (stats.chunked_tensors > 0) == chunked
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(tmp_path / "gpu" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].view(torch.int16), b[name].view(torch.int16)), name


def test_gpu_path_refuses_nonfinite_inputs(tmp_path, tiny_family):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_family.experts[0], bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("up_proj.weight"))
    tensors[name][2, 3] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    cfg = _config("ties", tiny_family)
    cfg["models"][0]["model"] = str(bad)
    (tmp_path / "gpu").mkdir()
    with pytest.raises(MergeError, match=rf"tensor '{name}'.*1 NaN"):
        _gpu_path(cfg, tmp_path / "gpu", 1 << 30)


def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path, tiny_family):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(pymerge.BackendUnavailable, match="no CUDA device"):
        pymerge.merge(_config("ties", tiny_family), tmp_path / "out", quiet=True, device="cuda")
    assert not (tmp_path / "out").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("method", sorted(PARAMS))
def test_device_cuda_whole_merge_equals_the_cpu_merge(tmp_path, tiny_family, method, backend):
    """On a GPU: ``merge(device='cuda')`` with each kernel set, under a budget that streams the embeddings, gives
    the CPU merge's tensors, every bit (DARE/DELLA's L1 rescale sums in the CPU's lane order: kernels.l1_rows)."""
    cfg = _config(method, tiny_family)
    ref = load_file(str(pymerge.merge(cfg, tmp_path / "ref", quiet=True, seed=3, backend="torch").out_dir
                        + "/model.safetensors"))
    torch.cuda.reset_peak_memory_stats()
    # 24 KiB of chunk buffers and scratch (the embedding needs 230-545 KiB at once) plus TIES's fixed bytes
    # (histograms; the Triton set's scratch copies) for the largest tensor, the 131 x 40 embedding
    budget = 24 * 1024
    if method == "ties":  # and the allocator's slack on that allocation of more than 1 MiB (gpu/plan.py)
        budget += 3 * 65536 * 8 + get_kernels(backend).ties_scratch(3, 131 * 40)[1] + (1 << 20)
    rep = pymerge.merge(cfg, tmp_path / "gpu", quiet=True, seed=3, device="cuda", backend=backend,
                        max_gpu_memory=budget)
    assert rep.device == "cuda" and rep.backend == backend and rep.chunked_tensors > 0
    peak = torch.cuda.max_memory_allocated()
    assert peak <= budget + (1 << 20), f"peak {peak} B for a budget of {budget} B"  # + small launch arguments
    got = load_file(rep.out_dir + "/model.safetensors")
    for name in ref:
        assert torch.equal(got[name].view(torch.int16), ref[name].view(torch.int16)), name
