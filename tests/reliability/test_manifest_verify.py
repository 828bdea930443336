"""pymerge_manifest.json and ``pymerge verify``: a fresh merge verifies; each kind of damage is caught and named."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

import pymerge
from pymerge.api import verify
from pymerge.cli import main
from pymerge.errors import CheckpointError
from pymerge.io.manifest import MANIFEST_NAME

from ._family import linear_config, make_family

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """One sharded merge (3 shards + index), copied fresh for each test that damages it."""
    root = tmp_path_factory.mktemp("manifest")
    paths = make_family(root / "f")
    (paths[0] / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    (paths[0] / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}\n')
    pymerge.merge(linear_config(paths), root / "out", quiet=True, out_shard_size="20KB")
    return root / "out"


@pytest.fixture
def out(merged, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(merged, dst)
    return dst


def _runner():
    try:
        return CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout unless told not to
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps them apart and dropped the argument


def _run(out, *extra):
    res = _runner().invoke(main, ["verify", str(out), *extra])
    return res.exit_code, res.stdout, res.stderr


def test_manifest_describes_every_file_and_tensor(out):
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["format"] == "pymerge-manifest" and m["version"] == 1 and m["pymerge_version"] == pymerge.__version__
    on_disk = sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(m["files"]) == on_disk
    assert {"tokenizer_config.json", INDEX, "config.json", "README.md"} <= set(on_disk)
    for name, entry in m["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    index = json.loads((out / INDEX).read_text())
    assert {t["name"]: t["shard"] for t in m["tensors"]} == index["weight_map"]
    from safetensors import safe_open

    for t in m["tensors"]:
        with safe_open(str(out / t["shard"]), "pt") as f:
            sl = f.get_slice(t["name"])
            assert (sl.get_dtype(), sl.get_shape()) == (t["dtype"], t["shape"])


def test_fresh_merge_verifies(out):
    report = verify(out)
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert (report.files, report.tensors) == (len(m["files"]), 3)
    code, stdout, stderr = _run(out)
    assert code == 0 and stdout.strip() == f"ok: {report.files} files, 3 tensors" and stderr == ""
    code, stdout, _ = _run(out, "--json")
    assert code == 0 and json.loads(stdout) == {"ok": True, "out_dir": str(out), "files": report.files,
                                                "tensors": 3, "bytes": report.bytes}


def _shard(out, i=2):
    return out / f"model-0000{i}-of-00003.safetensors"


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["data", "header"])
def test_flipped_byte_is_caught_by_the_hash(out, where):
    p = _shard(out)
    _flip(p, p.stat().st_size - 5 if where == "data" else 20)
    with pytest.raises(CheckpointError, match=rf"{p.name}: sha256 .* does not match"):
        verify(out)
    code, stdout, stderr = _run(out)
    assert code == 1 and stdout == "" and stderr.startswith(f"error: {p}: sha256")
    assert len(stderr.strip().splitlines()) == 1


def test_truncated_shard(out):
    p = _shard(out, 1)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=rf"{p}: size is {size - 100} bytes, the manifest says {size}"):
        verify(out)


def test_deleted_index(out):
    (out / INDEX).unlink()
    with pytest.raises(CheckpointError, match=rf"{out / INDEX}: listed in the manifest but missing"):
        verify(out)
    code, stdout, _ = _run(out, "--json")
    res = json.loads(stdout)
    assert code == 1 and res["ok"] is False and INDEX in res["error"]


@pytest.mark.parametrize("name", ["model-00004-of-00004.safetensors", "sub/model.safetensors"])
def test_stray_shard(out, name):
    (out / name).parent.mkdir(exist_ok=True)
    shutil.copy(_shard(out, 1), out / name)
    with pytest.raises(CheckpointError, match=rf"{out / name}: unexpected safetensors file"):
        verify(out)


def test_extra_non_weight_file_is_tolerated(out):
    (out / "NOTES.txt").write_text("my notes\n")
    assert verify(out).tensors == 3


def test_index_edited_consistently_with_its_manifest_entry_is_still_caught(out):
    # Someone edits the index and "fixes" the manifest's hash: the index/shard cross-check still catches it.
    index = json.loads((out / INDEX).read_text())
    index["metadata"]["total_size"] += 1
    (out / INDEX).write_text(json.dumps(index))
    m = json.loads((out / MANIFEST_NAME).read_text())
    data = (out / INDEX).read_bytes()
    m["files"][INDEX] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"metadata.total_size is \d+, the shards hold \d+ bytes"):
        verify(out)


@pytest.mark.parametrize("damage, needle", [
    (lambda out: (out / MANIFEST_NAME).unlink(), "no manifest"),
    (lambda out: (out / MANIFEST_NAME).write_text("{not json"), "cannot read manifest as JSON"),
    (lambda out: (out / MANIFEST_NAME).write_text('{"format": "other"}'), "not a pymerge manifest"),
    (lambda out: _edit_manifest(out, lambda m: m["files"].update({"../escape": {"size": 1, "sha256": "x"}})),
     "must be a relative path inside the directory"),
    (lambda out: _edit_manifest(out, lambda m: m.update(version=99)), "manifest version 99 is not supported"),
])
def test_bad_manifest(out, damage, needle):
    damage(out)
    with pytest.raises(CheckpointError, match=needle):
        verify(out)
    code, _, stderr = _run(out)
    assert code == 1 and needle in stderr


def _edit_manifest(out, fn):
    m = json.loads((out / MANIFEST_NAME).read_text())
    fn(m)
    (out / MANIFEST_NAME).write_text(json.dumps(m))


def test_missing_directory(tmp_path):
    code, _, stderr = _run(tmp_path / "nope")
    assert code == 1 and stderr.strip() == f"error: output directory {tmp_path / 'nope'} does not exist"


def test_single_shard_output_verifies(tmp_path, tiny_family):
    cfg = {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}}
                                                for p in [tiny_family.base, *tiny_family.experts]]}
    pymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out" / INDEX).exists()
    assert verify(tmp_path / "out").tensors == len(pymerge.io.Checkpoint.open(tmp_path / "out").names())
