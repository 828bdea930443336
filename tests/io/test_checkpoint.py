"""Checkpoint layouts, index validation (including escape attempts), and the pickle opt-in."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from pymerge.errors import CheckpointError
from pymerge.io.checkpoint import Checkpoint


@pytest.fixture(autouse=True)
def _stay_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def model_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(11, 6, generator=g).to(torch.bfloat16),
        "layers.0.q.weight": torch.randn(6, 6, generator=g),
        "layers.0.q.bias": torch.randn(6, generator=g).half(),
        "layers.1.q.weight": torch.randn(6, 6, generator=g),
        "norm.scale": torch.randn((), generator=g),
        "empty": torch.zeros(0, 3),
    }


SHARDS = {
    "model-00001-of-00002.safetensors": ["embed.weight", "layers.0.q.weight", "layers.0.q.bias"],
    "model-00002-of-00002.safetensors": ["layers.1.q.weight", "norm.scale", "empty"],
}


def write_sharded(d, tensors, shards=SHARDS, weight_map=None):
    d.mkdir(parents=True, exist_ok=True)
    for fn, names in shards.items():
        save_file({n: tensors[n] for n in names}, str(d / fn))
    if weight_map is None:
        weight_map = {n: fn for fn, names in shards.items() for n in names}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    return d


def assert_serves(ck, tensors):
    assert sorted(ck.names()) == sorted(tensors)
    for name, ref in tensors.items():
        assert name in ck
        t = ck.tensor(name)
        assert t.dtype == ref.dtype and t.shape == ref.shape and torch.equal(t, ref), name
        info = ck.info(name)
        assert info.shape == tuple(ref.shape) and info.torch_dtype == ref.dtype
        n = info.n_rows
        ref_rows = ref.reshape(1) if ref.dim() == 0 else ref
        assert torch.equal(ck.rows(name, n // 3, n), ref_rows[n // 3 : n])
    assert "not.there" not in ck
    with pytest.raises(CheckpointError) as ei:
        ck.tensor("not.there")
    assert "not.there" in str(ei.value) and str(ck.path) in str(ei.value)
    with pytest.raises(CheckpointError, match="out of range"):
        ck.rows("embed.weight", 0, 12)


def test_single_file_path(tmp_path):
    t = model_tensors()
    save_file(t, str(tmp_path / "weights.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with Checkpoint.open(tmp_path / "weights.safetensors") as ck:
        assert ck.path == tmp_path and ck.config_path == tmp_path / "config.json"
        assert ck.files() == [tmp_path / "weights.safetensors"]
        assert_serves(ck, t)


def test_dir_with_model_safetensors(tmp_path):
    t = model_tensors()
    save_file(t, str(tmp_path / "model.safetensors"))
    save_file({"x": torch.ones(1)}, str(tmp_path / "other.safetensors"))  # ignored: model.safetensors wins
    ck = Checkpoint.open(str(tmp_path))
    assert ck.config_path is None
    assert_serves(ck, t)


def test_dir_with_one_oddly_named_file(tmp_path):
    t = model_tensors()
    save_file(t, str(tmp_path / "weights.safetensors"))
    assert_serves(Checkpoint.open(tmp_path), t)


def test_dir_with_several_files_and_no_index(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"b": torch.ones(1)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint.open(tmp_path)


def test_empty_dir_and_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="weights.npz"):
        Checkpoint.open(tmp_path / "weights.npz")


def test_sharded_index(tmp_path):
    t = model_tensors()
    d = write_sharded(tmp_path / "m", t)
    ck = Checkpoint.open(d)
    assert ck.files() == [d / fn for fn in sorted(SHARDS)]
    # Names come shard by shard, so walking them reads files sequentially.
    assert set(ck.names()[:3]) == set(SHARDS["model-00001-of-00002.safetensors"])
    assert_serves(ck, t)
    assert ck.info("norm.scale").path == d / "model-00002-of-00002.safetensors"
    # The index file itself is accepted as the path too.
    assert_serves(Checkpoint.open(d / "model.safetensors.index.json"), t)


def _index_error(d, match):
    with pytest.raises(CheckpointError, match=match) as ei:
        Checkpoint.open(d)
    assert "model.safetensors.index.json" in str(ei.value)


def test_index_shard_with_dotdot(tmp_path):
    t = model_tensors()
    d = write_sharded(tmp_path / "m", t)
    save_file({"layers.1.q.weight": t["layers.1.q.weight"]}, str(tmp_path / "x.safetensors"))  # exists outside
    wm = {n: fn for fn, names in SHARDS.items() for n in names}
    wm["layers.1.q.weight"] = "../x.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    _index_error(d, r"'\.\./x\.safetensors'.*'\.\.'")


def test_index_shard_absolute(tmp_path):
    t = model_tensors()
    d = write_sharded(tmp_path / "m", t)
    wm = {n: str(d / fn) for fn, names in SHARDS.items() for n in names}  # absolute, even though inside
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    _index_error(d, "relative")


def test_index_shard_symlink_escaping(tmp_path):
    t = model_tensors()
    d = write_sharded(tmp_path / "m", t)
    outside = tmp_path / "outside"
    outside.mkdir()
    fn = "model-00002-of-00002.safetensors"
    os.replace(d / fn, outside / fn)
    (d / fn).symlink_to(outside / fn)
    _index_error(d, "outside the checkpoint directory")
    # A symlink that stays inside the directory is fine.
    os.replace(outside / fn, d / "real.safetensors")
    (d / fn).unlink()
    (d / fn).symlink_to("real.safetensors")
    assert_serves(Checkpoint.open(d), t)


def test_index_shard_not_safetensors(tmp_path):
    t = model_tensors()
    d = write_sharded(tmp_path / "m", t)
    os.replace(d / "model-00002-of-00002.safetensors", d / "shard2.bin")
    wm = {n: fn for fn, names in SHARDS.items() for n in names}
    wm.update({n: "shard2.bin" for n in SHARDS["model-00002-of-00002.safetensors"]})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    _index_error(d, "'shard2.bin' must end with .safetensors")


def test_index_missing_shard(tmp_path):
    d = write_sharded(tmp_path / "m", model_tensors())
    (d / "model-00002-of-00002.safetensors").unlink()
    _index_error(d, "'model-00002-of-00002.safetensors' does not exist")


def test_index_tensor_not_in_its_shard(tmp_path):
    t = model_tensors()
    wm = {n: fn for fn, names in SHARDS.items() for n in names}
    wm["norm.scale"] = "model-00001-of-00002.safetensors"
    d = write_sharded(tmp_path / "m", t, weight_map=wm)
    _index_error(d, "'norm.scale'.*does not contain it")


def test_index_names_tensor_no_shard_has(tmp_path):
    t = model_tensors()
    wm = {n: fn for fn, names in SHARDS.items() for n in names}
    wm["ghost"] = "model-00001-of-00002.safetensors"
    d = write_sharded(tmp_path / "m", t, weight_map=wm)
    _index_error(d, "'ghost'")


def test_tensor_in_two_shards(tmp_path):
    t = model_tensors()
    shards = {k: list(v) for k, v in SHARDS.items()}
    shards["model-00002-of-00002.safetensors"].append("embed.weight")
    wm = {n: fn for fn, names in SHARDS.items() for n in names}
    d = write_sharded(tmp_path / "m", t, shards=shards, weight_map=wm)
    _index_error(d, "'embed.weight' is present in two shards")


def test_shard_tensor_missing_from_index(tmp_path):
    t = model_tensors()
    wm = {n: fn for fn, names in SHARDS.items() for n in names}
    del wm["empty"]
    d = write_sharded(tmp_path / "m", t, weight_map=wm)
    _index_error(d, "'empty' that the index does not list")


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "JSON"),
        ("[]", "weight_map"),
        ('{"metadata": {}}', "weight_map"),
        ('{"weight_map": []}', "must be an object"),
        ('{"weight_map": {"a": 3}}', r"weight_map\['a'\]"),
    ],
)
def test_malformed_index(tmp_path, content, match):
    d = write_sharded(tmp_path / "m", model_tensors())
    (d / "model.safetensors.index.json").write_text(content)
    _index_error(d, match)


def test_hub_cache_symlinks_are_accepted(tmp_path):
    # <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>, as huggingface_hub lays out its cache.
    t = model_tensors()
    staging = write_sharded(tmp_path / "staging", t)
    repo = tmp_path / "models--org--m"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(staging.iterdir())):
        os.replace(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../blobs/blob{i}")
    assert_serves(Checkpoint.open(snap), t)


# ---- pickle ------------------------------------------------------------------------------------------------


def test_pickle_refused_by_default_and_served_when_allowed(tmp_path):
    t = model_tensors(3)
    torch.save(t, tmp_path / "pytorch_model.bin")
    for p in (tmp_path, tmp_path / "pytorch_model.bin"):
        with pytest.raises(CheckpointError, match="pickle") as ei:
            Checkpoint.open(p)
        assert "pytorch_model.bin" in str(ei.value)
    ck = Checkpoint.open(tmp_path, allow_pickle=True)
    assert ck.files() == [tmp_path / "pytorch_model.bin"]
    assert_serves(ck, t)
    assert ck.info("embed.weight").nbytes == 11 * 6 * 2


def test_sharded_pickle(tmp_path):
    t = model_tensors(4)
    shards = {
        "pytorch_model-00001-of-00002.bin": ["embed.weight", "layers.0.q.weight", "layers.0.q.bias"],
        "pytorch_model-00002-of-00002.bin": ["layers.1.q.weight", "norm.scale", "empty"],
    }
    for fn, names in shards.items():
        torch.save({n: t[n] for n in names}, tmp_path / fn)
    wm = {n: fn for fn, names in shards.items() for n in names}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint.open(tmp_path)
    assert_serves(Checkpoint.open(tmp_path, allow_pickle=True), t)
    wm["norm.scale"] = "../evil.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CheckpointError, match=r"'\.\.'"):
        Checkpoint.open(tmp_path, allow_pickle=True)


def test_pickle_with_non_tensor_entries(tmp_path):
    torch.save({"w": torch.ones(2), "step": 5}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="'step'"):
        Checkpoint.open(tmp_path, allow_pickle=True)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot load"):
        Checkpoint.open(tmp_path, allow_pickle=True)


def test_safetensors_preferred_over_pickle(tmp_path):
    t = model_tensors()
    save_file(t, str(tmp_path / "model.safetensors"))
    torch.save({"other": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert_serves(Checkpoint.open(tmp_path), t)  # no pickle error: it is never touched
