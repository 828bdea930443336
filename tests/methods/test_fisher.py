"""Fisher merging against a float64 oracle written from MergeLM's fisher_merging formulas, chunk invariance,
errors, and an end-to-end merge of the tiny family with generated Fisher files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.errors import CheckpointError, ConfigError, MergeError
from pymerge.methods import Chunk, TensorJob, get_method

F64 = torch.float64
SHAPES = {"w.odd": (13, 7), "w.tall": (37, 3), "v.vec": (11,), "s.scalar": ()}


def run_method(method: str, inputs: dict[str, list[torch.Tensor]], aux: dict[str, dict[str, list]], *,
               params: dict | None = None, model_params: list[dict] | None = None,
               max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """Drive a method the way the executor does (global passes over every tensor, then each tensor's passes),
    with statistics in TensorJob.aux and row chunks of at most ``max_rows`` rows."""
    m = get_method(method)
    n = len(next(iter(inputs.values())))
    mp = [dict(p) for p in (model_params or [{} for _ in range(n)])]
    prm = dict(params or {})
    for spec in m.spec.params:
        if spec.per_model:
            for p in mp:
                p.setdefault(spec.name, spec.default if not spec.required else "<file>")
        else:
            prm.setdefault(spec.name, spec.default)
    jobs, stacks = [], []
    for name, tensors in inputs.items():
        job = TensorJob(name=name, shape=tuple(tensors[0].shape), inputs=[f"m{i}" for i in range(n)],
                        base_index=None, params=prm, model_params=mp, model_ids=list(range(n)),
                        aux={k: v[name] for k, v in aux.items()})
        jobs.append(job)
        stacks.append(torch.stack([t.to(torch.float32).reshape(job.rows, job.row_numel) for t in tensors]))

    def chunks(job, data):
        step = job.rows if max_rows is None else max_rows
        return [Chunk(a, min(a + step, job.rows), data[:, a:a + step]) for a in range(0, job.rows, step)]

    passes = m.global_passes(prm)
    if passes:
        state = m.global_init(jobs)
        for p in range(passes):
            for job, data in zip(jobs, stacks):
                for c in chunks(job, data):
                    m.global_reduce(state, p, job, c)
            result = m.global_end_pass(state, p)
        for job in jobs:
            job.global_state = result
    out = {}
    for job, data in zip(jobs, stacks):
        merge = m.start(job)
        for p in range(merge.reduce_passes):
            for c in chunks(job, data):
                merge.reduce(p, c)
            merge.end_pass(p)
        out[job.name] = torch.cat([merge.map(c) for c in chunks(job, data)], dim=0).reshape(job.shape)
    return out


def fisher_oracle(models: list[dict[str, torch.Tensor]], fishers: list[dict[str, torch.Tensor]],
                  coeffs: list[float] | None = None, normalize: bool = True, eps: float = 1e-6):
    """MergeLM fisher_merging in float64: sum_t c_t (F_t+eps) theta_t / sum_t c_t (F_t+eps), c_t scaled by
    the normalised 1/(||F_t|| + eps) over all parameters when ``normalize``. Returns (values, scales)."""
    t = len(models)
    c = torch.tensor(coeffs if coeffs is not None else [1.0 / t] * t, dtype=F64)
    if normalize:
        norms = torch.stack([torch.sqrt(sum((f[k].to(F64) ** 2).sum() for k in f)) for f in fishers])
        inv = 1.0 / (norms + eps)
        c = c * inv / inv.sum()
    values, scales = {}, {}
    for k in models[0]:
        theta = torch.stack([m[k].to(F64) for m in models])
        fis = torch.stack([f[k].to(F64) for f in fishers]) + eps
        cc = c.reshape(-1, *[1] * (theta.dim() - 1))
        values[k] = (cc * fis * theta).sum(0) / (cc * fis).sum(0)
        scales[k] = theta.abs().amax(0)
    return values, scales


def _random_models(n, seed, zero_fisher_in=None):
    g = torch.Generator().manual_seed(seed)
    models, fishers = [], []
    for i in range(n):
        models.append({k: torch.randn(s, generator=g) for k, s in SHAPES.items()})
        # Fisher values span several decades, like real ones; some exact zeros exercise the eps
        f = {k: torch.rand(s, generator=g) ** 4 * 10.0 ** float(torch.randint(-6, 1, (), generator=g))
             for k, s in SHAPES.items()}
        if zero_fisher_in is not None and i == zero_fisher_in:
            f["w.odd"][2:5] = 0
        fishers.append(f)
    return models, fishers


def _inputs(models, fishers):
    return ({k: [m[k] for m in models] for k in SHAPES}, {"fisher": {k: [f[k] for f in fishers] for k in SHAPES}})


def _assert_close(ours, values, scales, rel=2e-6):
    for k in values:
        err = (ours[k].to(F64) - values[k]).abs()
        bound = rel * scales[k] + 1e-30
        assert bool((err <= bound).all()), f"{k}: max error {float((err / bound).max())} x the bound"


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("coeffs", [None, [0.5, 0.2, 0.3], [1.0, 0.0, 3.0]])
def test_matches_float64_oracle(normalize, coeffs):
    models, fishers = _random_models(3, seed=11, zero_fisher_in=1)
    inputs, aux = _inputs(models, fishers)
    mp = [{"fisher_scaling_coefficient": c} for c in (coeffs or [1.0] * 3)]  # 1/T and 1 are the same weights
    ours = run_method("fisher", inputs, aux, params={"normalize_fisher_weight": normalize}, model_params=mp)
    values, scales = fisher_oracle(models, fishers, coeffs, normalize)
    _assert_close(ours, values, scales)


def test_epsilon_and_two_models():
    models, fishers = _random_models(2, seed=3)
    for f in fishers:
        f["v.vec"].zero_()  # only eps left: a plain (normalised-coefficient) average
    inputs, aux = _inputs(models, fishers)
    ours = run_method("fisher", inputs, aux, params={"minimal_fisher_weight": 1e-3})
    values, scales = fisher_oracle(models, fishers, None, True, eps=1e-3)
    _assert_close(ours, values, scales)


def test_normalization_changes_the_result():
    models, fishers = _random_models(3, seed=5)
    fishers[0] = {k: v * 1000 for k, v in fishers[0].items()}  # one model with a much larger Fisher
    inputs, aux = _inputs(models, fishers)
    a = run_method("fisher", inputs, aux, params={"normalize_fisher_weight": True})
    b = run_method("fisher", inputs, aux, params={"normalize_fisher_weight": False})
    assert not torch.allclose(a["w.odd"], b["w.odd"])


def test_bf16_statistics_are_widened():
    models, fishers = _random_models(3, seed=9)
    fishers = [{k: v.to(torch.bfloat16) for k, v in f.items()} for f in fishers]
    inputs, aux = _inputs(models, fishers)
    values, scales = fisher_oracle(models, fishers)
    _assert_close(run_method("fisher", inputs, aux), values, scales)


@pytest.mark.parametrize("max_rows", [1, 2, 7])
def test_bit_identical_for_any_chunking(max_rows):
    models, fishers = _random_models(3, seed=21, zero_fisher_in=0)
    inputs, aux = _inputs(models, fishers)
    whole = run_method("fisher", inputs, aux)
    chunked = run_method("fisher", inputs, aux, max_rows=max_rows)
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k


def test_errors():
    models, fishers = _random_models(2, seed=1)
    inputs, aux = _inputs(models, fishers)
    with pytest.raises(ConfigError, match="fisher_scaling_coefficient"):
        run_method("fisher", inputs, aux, model_params=[{"fisher_scaling_coefficient": -1.0},
                                                        {"fisher_scaling_coefficient": 1.0}])
    with pytest.raises(MergeError, match="no Fisher statistics for input 'm1'"):
        run_method("fisher", inputs, {"fisher": {k: [v[0], None] for k, v in aux["fisher"].items()}})
    negative = {"fisher": {k: [-torch.ones_like(v[0]), -torch.ones_like(v[1])] for k, v in aux["fisher"].items()}}
    with pytest.raises(MergeError, match="sum to zero or less"):
        run_method("fisher", inputs, negative, params={"normalize_fisher_weight": False})


# ------------------------------------------------------------------------------------------- end to end


def _fisher_files(family, root: Path, seed: int) -> list[Path]:
    """One random Fisher file per expert, with each model's tensor names and shapes."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i, d in enumerate(family.experts):
        weights = load_file(str(d / "model.safetensors"))
        fis = {k: torch.rand(v.shape, generator=g) ** 3 * (i + 1) for k, v in weights.items()}
        p = root / f"fisher{i}.safetensors"
        save_file(fis, str(p))
        paths.append(p)
    return paths


def _write_config(root: Path, family, fisher_paths, params=None) -> Path:
    cfg = {"merge_method": "fisher", "dtype": "float32",
           "models": [{"model": str(d), "parameters": {"fisher": str(p.name) if p is not None else None,
                                                         "fisher_scaling_coefficient": c}}
                      for d, p, c in zip(family.experts, fisher_paths, [1.0, 0.5, 2.0])]}
    for m in cfg["models"]:
        if m["parameters"]["fisher"] is None:
            del m["parameters"]["fisher"]
    if params:
        cfg["parameters"] = params
    path = root / "fisher.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_end_to_end_tiny_family(tiny_family, tmp_path):
    paths = _fisher_files(tiny_family, tmp_path, seed=4)  # relative names in the config: resolved from its dir
    out = tmp_path / "out"
    report = pymerge.merge(_write_config(tmp_path, tiny_family, paths), out, quiet=True, max_memory=20_000)
    merged = load_file(str(out / "model.safetensors"))
    models = [load_file(str(d / "model.safetensors")) for d in tiny_family.experts]
    fishers = [load_file(str(p)) for p in paths]
    values, scales = fisher_oracle(models, fishers, [1.0, 0.5, 2.0], normalize=True)
    assert sorted(merged) == sorted(values)
    _assert_close(merged, values, scales)
    # the Fisher-norm pass reads only the statistics: the model weights are read once, by the merge
    weight_bytes = sum(p.stat().st_size for d in tiny_family.experts for p in d.glob("*.safetensors"))
    assert 0.95 < report.bytes_read / weight_bytes < 1.0  # the files also hold their headers


def test_end_to_end_errors(tiny_family, tmp_path):
    paths = _fisher_files(tiny_family, tmp_path, seed=4)
    with pytest.raises(ConfigError, match="'fisher' is required"):
        pymerge.merge(_write_config(tmp_path, tiny_family, [paths[0], None, paths[2]]), tmp_path / "o1", quiet=True)
    bad = load_file(str(paths[1]))
    bad["model.layers.1.mlp.up_proj.weight"] = torch.rand(40, 104)
    save_file(bad, str(paths[1]))
    with pytest.raises(CheckpointError) as e:
        pymerge.merge(_write_config(tmp_path, tiny_family, paths), tmp_path / "o2", quiet=True)
    msg = str(e.value)
    assert "fisher1.safetensors" in msg and "model.layers.1.mlp.up_proj.weight" in msg
    assert "[40, 104]" in msg and "[104, 40]" in msg
    assert not (tmp_path / "o2").exists()
    del bad["model.layers.1.mlp.up_proj.weight"]
    save_file(bad, str(paths[1]))
    with pytest.raises(CheckpointError, match="no Fisher entry for tensor 'model.layers.1.mlp.up_proj.weight'"):
        pymerge.merge(_write_config(tmp_path, tiny_family, paths), tmp_path / "o3", quiet=True)
