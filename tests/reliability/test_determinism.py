"""Determinism matrix: for every registered method, the same config and seed give byte-identical output files
whatever the backend (torch, and cpu where it runs the method), the memory budget (default, or tiny enough to
stream the matrices in row chunks) and the torch thread count (1 or 2).

Methods whose parameters include a statistics file (``ParamSpec.statistics``) are skipped: this tiny family has
none. A method with a required parameter this table has no value for is skipped with its name, so a new method
shows up in the report instead of passing unchecked.
"""

from __future__ import annotations

import pytest
import torch
import yaml

import pymerge
from pymerge.errors import PymergeError
from pymerge.executor import FP32, bytes_per_row
from pymerge.methods import get_method, method_names
from pymerge.methods.dare_native import della_scratch_per_element
from pymerge.ops import threads as threads_module
from pymerge.ops.backend import resolve_backend
from pymerge.plan import build_plan

# A value for every parameter name the methods use; a method gets the ones its spec declares.
VALUES = {"weight": 0.7, "density": 0.45, "epsilon": 0.1, "gamma": 0.05, "t": 0.3, "lambda": 0.9,
          "select_topk": 0.5, "scale": 0.5, "beta": 0.5}
# The tiny budget streams the largest tensor in this many row chunks (and the others in fewer). More chunks work
# as well, but each costs parallel regions, which a loaded 2-core CI machine makes slow.
CHUNKS = 3
# Tensors below this many input elements run on one thread whatever is asked (pymerge.ops.threads); lowered so
# that the largest matrices (the embedding and lm_head of the tiny preset) run on the thread count under test.
MULTI_THREAD_ELEMENTS = 20_000
SEED = 1234


def _config(method: str, family) -> dict:
    spec = get_method(method).spec
    if any(getattr(p, "statistics", None) for p in spec.params):
        pytest.skip(f"{method} needs statistics files, which this test family does not have")
    missing = [p.name for p in spec.params if p.required and p.name not in VALUES]
    if missing:
        pytest.skip(f"{method}: no test value for required parameter(s) {missing}; add them to VALUES")
    models = [family.base, *family.experts]
    n = min(len(models), spec.max_inputs or len(models))
    per_model = {p.name: VALUES[p.name] for p in spec.params if p.per_model and p.name in VALUES}
    shared = {p.name: VALUES[p.name] for p in spec.params if not p.per_model and p.name in VALUES}
    cfg: dict = {"merge_method": method}
    if spec.needs_base:
        cfg["base_model"] = str(family.base)
        cfg["models"] = [{"model": str(p), "parameters": dict(per_model)} for p in models[1:n]]
    else:
        cfg["models"] = [{"model": str(p), "parameters": dict(per_model)} for p in models[:n]]
    if shared:
        cfg["parameters"] = shared
    return cfg


def _tiny_budget(cfg_path, backend: str) -> int:
    """A budget that streams the tensor with the largest working set in about ``CHUNKS`` chunks of rows."""
    plan = build_plan(cfg_path, seed=SEED)
    try:
        sf = plan.method.scratch_factor
        per_row = {pt.name: bytes_per_row(pt.job, sf, FP32) for pt in plan.tensors}
        if backend == "torch":
            return max(per_row[pt.name] * -(-pt.job.rows // CHUNKS) for pt in plan.tensors)
        # A native backend may read its inputs straight from the memory maps and count only the output rows
        # against the budget; the budget must still hold one row of every tensor for the fp32 path.
        # (DELLA also counts the torch temporaries of its ranking per element.)
        della = plan.method.spec.name.startswith("della")
        out_rows = max(int(pt.job.row_numel * (FP32 * 2 + (della_scratch_per_element(pt.job) if della else 0)))
                       * -(-pt.job.rows // CHUNKS) for pt in plan.tensors)
        return max(out_rows, max(per_row.values()))
    finally:
        plan.close()


def _backends(method: str) -> list[str]:
    out = ["torch"]
    try:
        resolve_backend("cpu", method, "cpu")
        out.append("cpu")
    except PymergeError:
        pass  # the native CPU backend does not run this method (or is not built): nothing to compare
    return out


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("method", method_names())
def test_same_bytes_for_every_backend_budget_and_thread_count(tmp_path, tiny_family, monkeypatch, method):
    cfg = _config(method, tiny_family)
    cfg_path = tmp_path / "config.yml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(threads_module, "SINGLE_THREAD_ELEMENTS", MULTI_THREAD_ELEMENTS)
    before = torch.get_num_threads()
    reference = None
    try:
        for backend in _backends(method):
            for budget in (None, _tiny_budget(cfg_path, backend)):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    out = tmp_path / f"{backend}-{budget}-{threads}"
                    report = pymerge.merge(cfg_path, out, backend=backend, max_memory=budget, seed=SEED, quiet=True)
                    assert (report.chunked_tensors > 0) == (budget is not None)  # the tiny budget streams
                    got = _files(out)
                    if reference is None:
                        reference = got
                        continue
                    assert sorted(got) == sorted(reference)
                    for name in reference:
                        assert got[name] == reference[name], (backend, budget, threads, name)
    finally:
        torch.set_num_threads(before)
