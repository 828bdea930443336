"""The CPU kernels built for each x86-64 level (pymerge._C, _C_x86_64_v3, _C_x86_64_v4) write the same bits.

The other native tests run whichever level ``pymerge._native.cpu_module()`` picks on this machine (the best one
it supports) against the torch twins; here every level this CPU can run is compared byte for byte with the
default build, kernel by kernel, on odd sizes that span several parallel blocks and hold the special values
(NaN, Inf, -0, subnormals, ties). Also: how PYMERGE_CPU_ISA picks a level, and its errors.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pymerge._native as nat
from pymerge.errors import BackendUnavailable
from pymerge.ops import native_cpu as nc

base_module = nat.native_module()
pytestmark = pytest.mark.skipif(base_module is None, reason="pymerge._C is not built")


def _runnable_levels() -> list[tuple[str, object]]:
    levels = []
    if base_module is None:
        return levels
    for name, level, module_name in nat.CPU_LEVELS:
        if not base_module.cpu_supports_level(level):
            continue
        try:
            levels.append((name, importlib.import_module(module_name)))
        except ImportError:
            continue
    return levels


LEVELS = _runnable_levels()


@pytest.fixture
def use_module(monkeypatch):
    """Route the native_cpu wrappers to one kernel module."""
    def use(module) -> None:
        monkeypatch.setattr(nat, "_cpu_loaded", True)
        monkeypatch.setattr(nat, "_cpu_module", module)
        monkeypatch.setattr(nat, "_cpu_reason", None)
    return use


def _data(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, generator=g) * 0.02
    experts = [b + torch.randn(n, generator=g) * 0.01 for _ in range(3)]
    experts[1][::7] = b[::7]  # zero task-vector entries
    experts[2][5::11] = experts[0][5::11]  # equal magnitudes across experts
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, -3e-39])
    experts[0][: len(specials)] = specials
    base = b.to(dtype)
    return base, [x.to(dtype) for x in experts]


def _run_all(base: torch.Tensor, experts: list[torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """Every CPU kernel on the same inputs; each result as raw bytes (or int64 tensors)."""
    n = base.numel()
    out: dict[str, torch.Tensor] = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        out[f"cast->{dt}"] = nc.cast(experts[0], dt).view(torch.uint8)
    out["weighted_sum"] = nc.weighted_sum([base] + experts, [0.3, -0.2, 0.7, 0.25]).view(torch.uint8)
    out["weighted_sum_f32"] = nc.weighted_sum(experts, [0.5, 0.25, 0.125], normalize=True,
                                              out_dtype=torch.float32).view(torch.uint8)
    out["count_nonfinite"] = torch.tensor(nc.count_nonfinite([base] + experts))
    hi = nc.radix_hist_hi(experts, base=base)
    out["hist_hi"] = hi
    out["hist_lo"] = nc.radix_hist_lo(experts, [int(h.nonzero()[-1]) for h in hi], base=base)
    ths = nc.ties_thresholds(base, experts, [0.3, 0.61, 1.0])
    keys = [t.key for t in ths]
    cutoffs, _ = nc.tie_cutoffs(base, experts, keys, [nc.tie_budget(t) for t in ths])
    out["tie_cutoffs"] = torch.tensor(cutoffs + keys)
    for normalize in (False, True):
        for consensus in (False, True):
            out[f"ties_map{normalize}{consensus}"] = nc.ties_map(
                base, experts, [1.0, 0.5, -0.75], keys, cutoffs, lambda_=1.3, normalize=normalize,
                consensus=consensus, out_dtype=torch.float32).view(torch.uint8)
    out["band_map"] = nc.ties_map(base, experts, [1.0, 0.5, 0.75], keys, cutoffs, inner_keys=[k + 3 for k in keys],
                                  inner_cutoffs=[n // 2, -1, n]).view(torch.uint8)
    probs = [0.5, 1.0, torch.rand(n, generator=torch.Generator().manual_seed(3))]
    scales = [1.5, 1.0, 0.75]
    for consensus in ("sum", "count", None):
        out[f"dare_map_{consensus}"] = nc.dare_map(
            base, experts, [1.0, 0.4, 0.9], seed=11, model_ids=[1, 2, 3], tensor_name="t", probs=probs,
            scales=scales, start=1 << 33, consensus=consensus, normalize=True, lambda_=0.8).view(torch.uint8)
    b2, e2 = base.view(rows, -1), [x.view(rows, -1) for x in experts]
    out["dare_l1_rows"] = nc.dare_l1_rows(b2, e2, seed=5, model_ids=[4, 5, 6], tensor_name="u",
                                          probs=[0.3, 0.9, 0.5]).view(torch.uint8)
    out["della_probs"] = nc.della_probs(b2, e2[2], 0.4, 0.1).view(torch.uint8)
    out["philox_keep"] = nc.philox_keep_mask(7, 2, "w", 12345, n, 0.37).view(torch.uint8)
    return out


@pytest.mark.skipif(not LEVELS, reason="no x86-64-v3/v4 kernel module runs on this machine")
@pytest.mark.parametrize("level", [name for name, _ in LEVELS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_level_writes_the_default_builds_bits(level, dtype, use_module):
    module = dict(LEVELS)[level]
    rows = 7
    n = rows * 37_441  # several 64K-element parallel blocks, odd row length, not a multiple of any vector width
    base, experts = _data(n, dtype, seed=hash((level, str(dtype))) & 0xFFFF)
    use_module(base_module)
    want = _run_all(base, experts, rows)
    use_module(module)
    got = _run_all(base, experts, rows)
    assert nat.cpu_module() is module
    for name, w in want.items():
        assert torch.equal(got[name], w), f"{level}: {name} differs from the default build"


def test_auto_picks_the_best_runnable_level(monkeypatch):
    monkeypatch.delenv("PYMERGE_CPU_ISA", raising=False)
    nat._reset()
    try:
        picked = nat.cpu_module()
        assert picked is (LEVELS[0][1] if LEVELS else base_module)
        assert nat.build_info()["cpu_isa"] == (LEVELS[0][0] if LEVELS else "default")
    finally:
        nat._reset()


def test_setting_picks_a_level_by_name(monkeypatch):
    for name, module in [("default", base_module)] + LEVELS:
        monkeypatch.setenv("PYMERGE_CPU_ISA", name)
        nat._reset()
        assert nat.cpu_module() is module
        assert nat.build_info()["cpu_isa"] == name
    nat._reset()


def test_bad_setting_is_an_error_not_a_quiet_fallback(monkeypatch, tmp_path):
    from pymerge.ops.backend import resolve_backend

    monkeypatch.setenv("PYMERGE_CPU_ISA", "avx9000")
    nat._reset()
    try:
        assert nat.cpu_module() is None
        with pytest.raises(BackendUnavailable, match="PYMERGE_CPU_ISA='avx9000' is not one of auto, default"):
            nc.cast(torch.zeros(3), torch.bfloat16)
        for requested in ("auto", "cpu"):
            with pytest.raises(BackendUnavailable, match="PYMERGE_CPU_ISA"):
                resolve_backend(requested, "ties", "cpu")
        assert resolve_backend("torch", "ties", "cpu") == "torch"
    finally:
        nat._reset()


def test_level_this_cpu_cannot_run_is_refused(monkeypatch):
    missing = [(name, level) for name, level, _ in nat.CPU_LEVELS if not base_module.cpu_supports_level(level)]
    if not missing:
        # Pretend the CPU lacks v4: the setting must fail before anything imports the module.
        monkeypatch.setattr(nat, "native_module", lambda: _NoV4(base_module))
        missing = [("x86-64-v4", 4)]
    name, level = missing[0]
    monkeypatch.setenv("PYMERGE_CPU_ISA", name)
    nat._reset()
    try:
        with pytest.raises(BackendUnavailable, match=f"this CPU does not support x86-64-v{level}"):
            nc.cast(torch.zeros(3), torch.bfloat16)
    finally:
        nat._reset()


class _NoV4:
    def __init__(self, module):
        self._module = module

    def cpu_supports_level(self, level: int) -> bool:
        return level < 4 and self._module.cpu_supports_level(level)

    def __getattr__(self, name):
        return getattr(self._module, name)


def test_cpu_supports_level_is_monotone():
    answers = [base_module.cpu_supports_level(level) for level in (1, 2, 3, 4)]
    assert answers[0] or not any(answers)
    assert answers == sorted(answers, reverse=True), answers  # a CPU at level L runs every level below it
