"""pymerge.masks: packed per-task masks (format, build, apply, CLI) against the float64 oracles of the references.

The oracles and test data live in tests/methods/test_mask_methods.py (``Oracle``, ``make_models``): data on a
2**-16 grid, so every task vector, shared vector and mask decision is exact in fp32 and must match bit for bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.cli import main
from pymerge.errors import CheckpointError, ConfigError, MergeError
from pymerge.io.packed_masks import (RESCALERS, PackedMasks, PackedMasksWriter, count_ones, pack_bits,
                                     packed_nbytes, unpack_bits)
from pymerge.masks import apply_task_mask, build_task_masks, iter_task_model

from .methods.test_mask_methods import SHAPES, Oracle, assert_state_close, config, make_models, write_family

# ---------------------------------------------------------------------------------------------- bit packing

LENGTHS = [1, 2, 7, 8, 9, 13, 31, 64, 97, 1009]


def _pack_oracle(bits: list[bool]) -> list[int]:
    """Byte i = sum_j bits[8i + j] << j, the last byte zero padded (the documented format, bit by bit)."""
    return [sum(int(b) << j for j, b in enumerate(bits[i:i + 8])) for i in range(0, len(bits), 8)]


@pytest.mark.parametrize("n", LENGTHS)
def test_pack_matches_the_format_and_round_trips(n):
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(3, n, generator=g) < 0.37
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_nbytes(n)) and packed_nbytes(n) == -(-n // 8)
    for t in range(3):
        assert packed[t].tolist() == _pack_oracle(bits[t].tolist())
    assert torch.equal(unpack_bits(packed, n), bits)
    assert count_ones(packed) == bits.sum(dim=1).tolist()
    # numpy reads the same bytes with bitorder="little"
    assert np.array_equal(np.unpackbits(packed.numpy(), axis=-1, count=n, bitorder="little"), bits.numpy())


def test_bit_order_is_little_endian():
    """Element 8i + j is bit j of byte i: element 0 alone is 0x01, element 7 alone is 0x80, element 8 starts
    the next byte."""
    bits = torch.zeros(10, dtype=torch.bool)
    bits[0] = bits[7] = bits[9] = True
    assert pack_bits(bits).tolist() == [0x81, 0x02]


@pytest.mark.parametrize("n", [1, 9, 61, 1009])
def test_streamed_chunks_of_any_length_pack_like_the_whole(tmp_path, n):
    """Chunks that end mid-byte carry their bits into the next: the file holds exactly pack(whole)."""
    g = torch.Generator().manual_seed(n)
    bits = torch.rand(2, n, generator=g) < 0.5
    w = PackedMasksWriter(tmp_path / "m.safetensors", ["a", "b"], [("x", (n,))], {"method": "test"})
    tb = w.tensor("x")
    at = 0
    while at < n:
        step = int(torch.randint(1, 12, (1,), generator=g))
        tb.add(bits[:, at:at + step])
        at += step
    tb.close()
    w.commit([1.0, 2.5])
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:  # any safetensors reader opens the file
        assert torch.equal(f.get_tensor("x"), pack_bits(bits))
        assert f.get_tensor(RESCALERS).tolist() == [1.0, 2.5]
    assert not list(tmp_path.glob(".*tmp*"))


# ---------------------------------------------------------------------------------------------- build/apply

CASES = {
    "tall_masks": ("tall_masks", {}, [0.5, 0.25, 0.375]),
    "tall_masks_nondyadic": ("tall_masks", {}, [0.6, 0.2, 0.45]),
    "tall_masks_ties": ("tall_masks", {"use_ties": True}, [0.5, 0.5, 0.25]),
    "tall_masks_k": ("tall_masks", {"k": 40}, None),
    "emr": ("emr", {}, None),
    "mmer": ("mmer", {"alpha": 0.75, "lambda": 0.5}, None),
    "mmer_nondyadic": ("mmer", {"alpha": 0.9, "lambda": 0.85}, None),
}


def _build(tmp_path: Path, case: str, coarse: bool, seed: int = 0):
    method, params, lambdas = CASES[case]
    base, experts = make_models(20 + seed + len(case), 3, coarse=coarse)
    bdir, edirs = write_family(tmp_path / "models", base, experts)
    per_model = [{"tall_mask_lambda": lam} for lam in lambdas] if lambdas else None
    cfg = config(method, bdir, edirs, params, per_model)
    report = build_task_masks(cfg, tmp_path / "masks.safetensors")
    pymerge.merge(cfg, tmp_path / "merged", quiet=True)
    return cfg, report, Oracle(base, experts, method, params, lambdas), edirs


@pytest.mark.parametrize("coarse", [False, True], ids=["fine", "ties"])
@pytest.mark.parametrize("case", list(CASES))
def test_masks_and_rescalers_match_oracle(tmp_path, case, coarse):
    _, report, ref, edirs = _build(tmp_path, case, coarse)
    assert report.tasks == [str(p) for p in edirs]
    with PackedMasks(tmp_path / "masks.safetensors") as pm:
        assert pm.method == CASES[case][0] and pm.tasks == report.tasks
        assert pm.shapes == {n: tuple(s) for n, s in SHAPES.items()}
        for t in range(3):
            want = ref.mask_state(t)
            for name in SHAPES:
                got = pm.mask(name, t)
                assert torch.equal(got, want[name]), (case, t, name, int((got != want[name]).sum()))
        # EMR's rescalers are float64 sums of per-tensor means: only the summation order may differ
        torch.testing.assert_close(torch.tensor(pm.rescalers, dtype=torch.float64),
                                   torch.tensor(ref.rescalers, dtype=torch.float64), rtol=1e-12, atol=0)
    assert report.rescalers == pm.rescalers


@pytest.mark.parametrize("case", ["tall_masks", "tall_masks_ties", "emr", "mmer", "mmer_nondyadic"])
def test_applied_masks_equal_the_oracle_task_models(tmp_path, case):
    """theta_0 + r_t m_t (merged - theta_0) for every task; exact where r_t = 1 or dyadic (TALL, MMER 0.5)."""
    _, _, ref, edirs = _build(tmp_path, case, coarse=False)
    exact = case in ("tall_masks", "tall_masks_ties", "mmer")
    for t in range(3):
        got = apply_task_mask(tmp_path / "merged", tmp_path / "masks.safetensors", t)
        assert_state_close(got, ref.task_state(t), exact=exact, what=f"{case} task {t}")
    # the same task by label and by the label's last path component
    by_label = apply_task_mask(tmp_path / "merged", tmp_path / "masks.safetensors", str(edirs[1]))
    by_name = apply_task_mask(tmp_path / "merged", tmp_path / "masks.safetensors", edirs[1].name)
    for n in by_label:
        assert torch.equal(by_label[n], by_name[n])


def test_apply_to_an_in_memory_state_and_explicit_base(tmp_path):
    _, _, ref, _ = _build(tmp_path, "tall_masks", coarse=True)
    merged = load_file(str(tmp_path / "merged/model.safetensors"))
    base = load_file(str(tmp_path / "models/base/model.safetensors"))
    got = apply_task_mask(merged, tmp_path / "masks.safetensors", 2, base=base)
    assert_state_close(got, ref.task_state(2), exact=True, what="in-memory")


def test_masks_do_not_depend_on_the_memory_budget(tmp_path):
    base, experts = make_models(4, 3, shapes={"model.embed_tokens.weight": (37, 29), "model.norm.weight": (29,)})
    bdir, edirs = write_family(tmp_path, base, experts)
    for method, params in [("tall_masks", {"use_ties": True}), ("emr", {}), ("mmer", {"alpha": 0.6})]:
        cfg = config(method, bdir, edirs, params)
        whole = build_task_masks(cfg, tmp_path / f"{method}_whole.safetensors")
        small = build_task_masks(cfg, tmp_path / f"{method}_small.safetensors", max_memory=6 * 1024)
        assert whole.chunked_tensors == 0 and small.chunked_tensors >= 1
        assert ((tmp_path / f"{method}_whole.safetensors").read_bytes()
                == (tmp_path / f"{method}_small.safetensors").read_bytes()), method


def test_metadata_header(tmp_path):
    cfg, report, _, edirs = _build(tmp_path, "tall_masks", coarse=True)
    with safe_open(str(tmp_path / "masks.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "pymerge.packed_masks" and meta["bit_order"] == "little"
        assert meta["method"] == "tall_masks"
        assert json.loads(meta["tasks"]) == [str(p) for p in edirs]
        assert json.loads(meta["shapes"]) == {n: list(s) for n, s in SHAPES.items()}
        assert Path(meta["base_model"]) == (Path(cfg["base_model"]) / "model.safetensors").resolve()
        assert [p["tall_mask_lambda"] for p in json.loads(meta["task_params"])] == [0.5, 0.25, 0.375]
        for n, s in SHAPES.items():
            assert f.get_slice(n).get_shape() == [3, packed_nbytes(math.prod(s))]
    assert report.bytes_written == (tmp_path / "masks.safetensors").stat().st_size


@pytest.mark.parametrize("method", ["tall_masks", "emr", "mmer"])
def test_tiny_family_end_to_end(tmp_path, tiny_family, method):
    """merge + build + apply on the synthetic Llama family; the rebuilt task models match the oracle's."""
    from pymerge.io.checkpoint import Checkpoint

    cfg = config(method, tiny_family.base, tiny_family.experts)
    pymerge.merge(cfg, tmp_path / "merged", quiet=True)
    build_task_masks(cfg, tmp_path / "masks.safetensors", max_memory=64 * 1024)
    with Checkpoint.open(tiny_family.base) as b:
        base = {n: b.tensor(n).clone() for n in b.names()}
    experts = []
    for e in tiny_family.experts:
        with Checkpoint.open(e) as ck:
            experts.append({n: ck.tensor(n).clone() for n in base})
    ref = Oracle(base, experts, method)
    with PackedMasks(tmp_path / "masks.safetensors") as pm:
        for t in range(len(experts)):
            for name, want in ref.mask_state(t).items():
                assert torch.equal(pm.mask(name, t), want), (method, t, name)
    task = tiny_family.experts[0].name
    got = apply_task_mask(tmp_path / "merged", tmp_path / "masks.safetensors", task)
    assert_state_close(got, ref.task_state(0), exact=False, what=method)


def test_cli_build_info_apply(tmp_path):
    base, experts = make_models(8, 2, coarse=True)
    bdir, edirs = write_family(tmp_path / "models", base, experts)
    cfg_path = tmp_path / "emr.yml"
    cfg_path.write_text(json.dumps(config("emr", bdir, edirs)))  # JSON is YAML
    runner = CliRunner()
    r = runner.invoke(main, ["run", str(cfg_path), str(tmp_path / "merged"), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["masks", "build", str(cfg_path), str(tmp_path / "m.safetensors"), "-q"])
    assert r.exit_code == 0, r.output
    assert "emr masks of 2 tasks" in r.output
    r = runner.invoke(main, ["masks", "info", str(tmp_path / "m.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["method"] == "emr" and info["tasks"] == [str(p) for p in edirs]
    r = runner.invoke(main, ["masks", "apply", str(tmp_path / "merged"), str(tmp_path / "m.safetensors"), "task1",
                             str(tmp_path / "task1"), "-q"])
    assert r.exit_code == 0, r.output
    written = load_file(str(tmp_path / "task1/model.safetensors"))
    want = apply_task_mask(tmp_path / "merged", tmp_path / "m.safetensors", 1)
    assert set(written) == set(want) and all(torch.equal(written[n], want[n]) for n in want)
    assert (tmp_path / "task1/config.json").is_file() == (tmp_path / "merged/config.json").is_file()
    r = runner.invoke(main, ["masks", "apply", str(tmp_path / "merged"), str(tmp_path / "m.safetensors"), "nope",
                             str(tmp_path / "x")])
    assert r.exit_code == 1 and "error: " in r.output and "unknown task 'nope'" in r.output
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ bad input


def test_masks_for_another_model_are_refused(tmp_path):
    _build(tmp_path / "a", "tall_masks", coarse=True)
    other = {n: torch.zeros(s) for n, s in SHAPES.items()}
    other["model.embed_tokens.weight"] = torch.zeros(12, 7)  # another vocabulary
    with pytest.raises(MergeError, match=r"does not belong to .*'model.embed_tokens.weight' has shape \[12, 7\]"):
        apply_task_mask(other, tmp_path / "a/masks.safetensors", 0)
    fewer = {n: torch.zeros(s) for n, s in SHAPES.items() if n != "lm_head.weight"}
    with pytest.raises(MergeError, match="missing .*lm_head.weight"):
        apply_task_mask(fewer, tmp_path / "a/masks.safetensors", 0)
    more = {**{n: torch.zeros(s) for n, s in SHAPES.items()}, "extra.weight": torch.zeros(3)}
    with pytest.raises(MergeError, match="without masks .*extra.weight"):
        apply_task_mask(more, tmp_path / "a/masks.safetensors", 0)
    wrong_base = {n: torch.zeros(s) for n, s in SHAPES.items()}
    wrong_base["lm_head.weight"] = torch.zeros(3, 7, 5)
    with pytest.raises(MergeError, match="base model"):
        apply_task_mask(tmp_path / "a/merged", tmp_path / "a/masks.safetensors", 0, base=wrong_base)


def test_unknown_task_lists_the_known_ones(tmp_path):
    _build(tmp_path, "emr", coarse=True)
    with pytest.raises(MergeError, match=r"unknown task 'vision'.*task0.*task1.*task2"):
        apply_task_mask(tmp_path / "merged", tmp_path / "masks.safetensors", "vision")
    with pytest.raises(MergeError, match="unknown task 3"):
        apply_task_mask(tmp_path / "merged", tmp_path / "masks.safetensors", 3)
    with pytest.raises(MergeError, match="unknown task"):
        next(iter_task_model(tmp_path / "merged", tmp_path / "masks.safetensors", -1))


def test_a_model_file_is_not_a_masks_file(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a packed-masks file"):
        PackedMasks(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        PackedMasks(tmp_path / "nothing.safetensors")


def test_tampered_masks_file_is_refused(tmp_path):
    _build(tmp_path, "tall_masks", coarse=True)
    with safe_open(str(tmp_path / "masks.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    shapes = json.loads(meta["shapes"])
    shapes["model.norm.weight"] = [70]  # needs 9 bytes per task, the file holds 1
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "shapes": json.dumps(shapes)})
    with pytest.raises(CheckpointError, match="masks of 'model.norm.weight' are U8 \\[3, 1\\], expected U8 \\[3, 9\\]"):
        PackedMasks(tmp_path / "bad.safetensors")


def test_build_refuses_methods_without_masks_and_existing_outputs(tmp_path):
    base, experts = make_models(2, 2, shapes={"model.norm.weight": (5,)})
    bdir, edirs = write_family(tmp_path, base, experts)
    with pytest.raises(ConfigError, match="consensus is a single model"):
        build_task_masks(config("consensus", bdir, edirs), tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="'ties' has no per-task masks"):
        build_task_masks(config("ties", bdir, edirs), tmp_path / "m.safetensors")
    # the method can come from the call: a ties config builds TALL masks, with tall_masks' defaults
    build_task_masks({"merge_method": "ties", "base_model": str(bdir), "models": [{"model": str(p)} for p in edirs]},
                     tmp_path / "m.safetensors", method="tall_masks")
    with PackedMasks(tmp_path / "m.safetensors") as pm:
        assert pm.method == "tall_masks"
    with pytest.raises(MergeError, match="exists"):
        build_task_masks(config("emr", bdir, edirs), tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(ConfigError):
        build_task_masks(config("tall_masks", bdir, edirs, {"k": 500}), tmp_path / "m.safetensors", overwrite=True)
    assert (tmp_path / "m.safetensors").read_bytes() == before  # a failed build leaves the old file alone
    assert not list(tmp_path.glob(".*tmp*"))
    build_task_masks(config("emr", bdir, edirs), tmp_path / "m.safetensors", overwrite=True)
    with PackedMasks(tmp_path / "m.safetensors") as pm:
        assert pm.method == "emr"


def test_nonfinite_inputs_are_refused(tmp_path):
    base, experts = make_models(2, 2, shapes={"model.norm.weight": (5,)})
    experts[1]["model.norm.weight"][2] = float("nan")
    bdir, edirs = write_family(tmp_path, base, experts)
    with pytest.raises(MergeError, match="model.norm.weight"):
        build_task_masks(config("emr", bdir, edirs), tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists() and not list(tmp_path.glob(".*tmp*"))
