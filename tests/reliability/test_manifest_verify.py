"""pymerge_manifest.json and ``pymerge verify``: a fresh merge verifies; each kind of damage is caught and named;
the merge hashes each output byte once (the manifest reuses the journal's tensor hashes); version 1 manifests of
earlier runs still verify."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner

import pymerge
import pymerge.executor as executor_module
import pymerge.io.journal as journal_module
import pymerge.io.manifest as manifest_module
from pymerge import api
from pymerge.api import verify
from pymerge.cli import main
from pymerge.errors import CheckpointError
from pymerge.io.atomic_dir import partial_dir_for
from pymerge.io.manifest import MANIFEST_NAME

from ._family import MATRIX, linear_config, make_family

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


def _layout(path):
    """(data start, {tensor: (absolute offset, length)}) of a safetensors file, parsed here independently."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return 8 + n, {name: (8 + n + t["data_offsets"][0], t["data_offsets"][1] - t["data_offsets"][0])
                   for name, t in header.items()}


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def test_manifest_describes_every_file_and_tensor(out):
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["format"] == "pymerge-manifest" and m["version"] == 2 and m["pymerge_version"] == pymerge.__version__
    on_disk = sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(m["files"]) == on_disk
    assert {"tokenizer_config.json", INDEX, "config.json", "README.md"} <= set(on_disk)
    shards = sorted(n for n in on_disk if n.endswith(".safetensors"))
    assert len(shards) == 3
    for name, entry in m["files"].items():
        data = (out / name).read_bytes()
        if name not in shards:
            assert entry == {"size": len(data), "sha256": _sha(data)}, name
            continue
        # Every shard is hashed in pieces (none fell back to a whole-file hash), and the pieces cover every byte.
        start, spans = _layout(out / name)
        assert entry == {"size": len(data), "header": {"length": start, "sha256": _sha(data[:start])},
                         "tensors": {t: {"offset": o, "length": n, "sha256": _sha(data[o:o + n])}
                                     for t, (o, n) in sorted(spans.items(), key=lambda kv: kv[1])}}, name
        assert start + sum(n for _, n in spans.values()) == len(data)
    index = json.loads((out / INDEX).read_text())
    assert {t["name"]: t["shard"] for t in m["tensors"]} == index["weight_map"]
    from safetensors import safe_open

    for t in m["tensors"]:
        with safe_open(str(out / t["shard"]), "pt") as f:
            sl = f.get_slice(t["name"])
            assert (sl.get_dtype(), sl.get_shape()) == (t["dtype"], t["shape"])


def _count_hashed(monkeypatch):
    """Record (module, bytes) for every sha256 the journal and the manifest compute from now on."""
    seen = []
    real = journal_module.sha256_range
    for mod in (journal_module, manifest_module):
        def counted(fd, offset, length, _mod=mod.__name__.rsplit(".", 1)[1]):
            seen.append((_mod, length))
            return real(fd, offset, length)
        monkeypatch.setattr(mod, "sha256_range", counted)
    return seen


def test_a_merge_hashes_each_output_byte_once(tmp_path, monkeypatch):
    paths = make_family(tmp_path / "f")
    seen = _count_hashed(monkeypatch)
    out = tmp_path / "out"
    pymerge.merge(linear_config(paths), out, quiet=True, out_shard_size="20KB")
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.name != MANIFEST_NAME}
    tensor_bytes = sum(n for f in files if f.endswith(".safetensors") for _, n in _layout(out / f)[1].values())
    # The writer hashed every tensor as it wrote it (rows in order), so the journal read nothing back; verify
    # re-reads every byte and so checks those hashes against the file.
    assert sum(n for mod, n in seen if mod == "journal") == 0
    assert sum(n for mod, n in seen if mod == "manifest") == sum(files.values()) - tensor_bytes
    assert verify(out).tensors == 3


def test_a_resumed_merge_records_the_tensors_of_both_runs(tmp_path, monkeypatch):
    paths = make_family(tmp_path / "f")
    cfg, out, clean = linear_config(paths), tmp_path / "out", tmp_path / "clean"
    pymerge.merge(cfg, clean, quiet=True, out_shard_size="20KB")
    real, calls = executor_module.merge_tensor, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # two tensors merged and journaled, then "Ctrl-C"
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(executor_module, "merge_tensor", stop)
        with pytest.raises(KeyboardInterrupt):
            pymerge.merge(cfg, out, quiet=True, out_shard_size="20KB")
    assert partial_dir_for(out).is_dir()
    seen = _count_hashed(monkeypatch)
    report = pymerge.merge(cfg, out, quiet=True, out_shard_size="20KB")
    assert report.resumed_tensors == 2
    # The resumed run read back the kept tensors once (to trust them); the manifest hashed only headers and
    # small files: the journal's hashes of both runs cover every tensor.
    headers = sum(_layout(p)[0] for p in out.glob("*.safetensors"))
    small = sum(p.stat().st_size for p in out.iterdir() if p.suffix != ".safetensors" and p.name != MANIFEST_NAME)
    assert sum(n for mod, n in seen if mod == "manifest") == headers + small
    assert (out / MANIFEST_NAME).read_bytes() == (clean / MANIFEST_NAME).read_bytes()
    assert verify(out).tensors == 3


def test_a_tensor_without_a_journal_hash_gets_its_shard_hashed_whole(tmp_path, monkeypatch, caplog):
    paths = make_family(tmp_path / "f")
    real = journal_module.TensorCommitter.entries
    monkeypatch.setattr(journal_module.TensorCommitter, "entries",
                        lambda self: {n: e for n, e in real(self).items() if n != MATRIX})
    out = tmp_path / "out"
    with caplog.at_level("DEBUG", logger="pymerge"):
        pymerge.merge(linear_config(paths), out, quiet=True, out_shard_size="20KB")
    assert f"no journal hash for tensor {MATRIX!r}" in caplog.text
    m = json.loads((out / MANIFEST_NAME).read_text())
    shard = next(t["shard"] for t in m["tensors"] if t["name"] == MATRIX)
    data = (out / shard).read_bytes()
    assert m["files"][shard] == {"size": len(data), "sha256": _sha(data)}
    assert sum("tensors" in e for e in m["files"].values()) == 2  # the other shards still use the journal
    assert verify(out).tensors == 3
    _flip(out / shard, len(data) - 3)
    with pytest.raises(CheckpointError, match=rf"{shard}: sha256 [0-9a-f]{{64}} does not match the manifest"):
        verify(out)


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


def test_flipped_byte_inside_a_tensor_names_the_tensor(out):
    p = _shard(out)
    start, spans = _layout(p)
    for name, (offset, length) in spans.items():
        at = offset + length // 2
        _flip(p, at)
        with pytest.raises(CheckpointError) as ei:
            verify(out)
        assert str(ei.value).startswith(f"{p}: sha256 of tensor {name!r} (bytes [{offset}, {offset + length})) ")
        assert "does not match the manifest" in str(ei.value)
        code, stdout, stderr = _run(out)
        assert code == 1 and stdout == "" and stderr == f"error: {ei.value}\n"
        _flip(p, at)  # undo: the next tensor's check starts from an intact file
    assert verify(out).tensors == 3


@pytest.mark.parametrize("at", [0, 7, 20, "last"])
def test_flipped_byte_in_the_header_region(out, at):
    p = _shard(out)
    start, _ = _layout(p)
    _flip(p, start - 1 if at == "last" else at)  # the length prefix, the JSON, its last (padding) byte
    with pytest.raises(CheckpointError, match=rf"{p.name}: sha256 of the header \(bytes \[0, {start}\)\) "
                                              r"[0-9a-f]{64} does not match the manifest"):
        verify(out)


@pytest.mark.parametrize("name", ["config.json", INDEX, "README.md"])
def test_flipped_byte_in_a_whole_file(out, name):
    _flip(out / name, 3)
    with pytest.raises(CheckpointError, match=rf"{out / name}: sha256 [0-9a-f]{{64}} does not match the manifest"):
        verify(out)


def _edit_entry(out, rel, fn):
    _edit_manifest(out, lambda m: fn(m["files"][rel]))


def _bump(hexdigest):
    return f"{(int(hexdigest, 16) + 1) % 16**64:064x}"


@pytest.mark.parametrize("what", ["tensor", "header", "whole"])
def test_each_kind_of_edited_hash_is_caught(out, what):
    shard = _shard(out).name
    name = sorted(_layout(out / shard)[1])[0]
    if what == "tensor":
        _edit_entry(out, shard, lambda e: e["tensors"][name].update(sha256=_bump(e["tensors"][name]["sha256"])))
        needle = rf"{shard}: sha256 of tensor {name!r} \(bytes"
    elif what == "header":
        _edit_entry(out, shard, lambda e: e["header"].update(sha256=_bump(e["header"]["sha256"])))
        needle = rf"{shard}: sha256 of the header \(bytes"
    else:
        _edit_entry(out, "config.json", lambda e: e.update(sha256=_bump(e["sha256"])))
        needle = r"config.json: sha256 [0-9a-f]{64} does not match"
    with pytest.raises(CheckpointError, match=needle):
        verify(out)


@pytest.mark.parametrize("edit, needle", [
    # a range shortened or moved leaves bytes no hash covers; the manifest alone is enough to refuse it
    (lambda e, n: e["tensors"][n].update(length=e["tensors"][n]["length"] - 4), "end at byte"),
    (lambda e, n: e["header"].update(length=e["header"]["length"] - 8), "leave bytes unhashed before tensor"),
    (lambda e, n: e["header"].update(length=e["header"]["length"] + 8), "overlap at tensor"),
    (lambda e, n: e["tensors"].pop(n), "end at byte"),
    (lambda e, n: e.update(size=e["size"] + 1), "size is"),
])
def test_ranges_that_do_not_tile_the_shard_are_refused(out, edit, needle):
    shard = _shard(out).name
    name = sorted(_layout(out / shard)[1])[0]
    _edit_entry(out, shard, lambda e: edit(e, name))
    with pytest.raises(CheckpointError, match=needle):
        verify(out)


def test_relabelled_tensor_ranges_are_caught(tmp_path):
    # Swap the names of two equal-sized neighbours in the manifest: every range still hashes right, but a mismatch
    # would be blamed on the wrong tensor; the cross-check against the shard's header refuses it.
    paths = make_family(tmp_path / "f")
    out = tmp_path / "out"
    pymerge.merge(linear_config(paths), out, quiet=True)
    m = json.loads((out / MANIFEST_NAME).read_text())
    ranges = m["files"]["model.safetensors"]["tensors"]
    embed = "model.embed_tokens.weight"
    assert ranges[embed]["length"] == ranges[MATRIX]["length"]
    ranges[embed], ranges[MATRIX] = ranges[MATRIX], ranges[embed]
    (out / MANIFEST_NAME).write_text(json.dumps(m))
    start, spans = _layout(out / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"the manifest hashes tensor {embed!r} as \(offset, length\) "
                                              rf"\({spans[MATRIX][0]}, \d+\), the shard's header puts it at "
                                              rf"\({spans[embed][0]}, \d+\)"):
        verify(out)


def test_per_tensor_hashes_of_a_file_without_tensors_are_refused(out):
    shard = _shard(out).name
    _edit_manifest(out, lambda m: m.update(tensors=[t for t in m["tensors"] if t["shard"] != shard]))
    with pytest.raises(CheckpointError, match=rf"{shard} is hashed per tensor, but the tensor list has none"):
        verify(out)


def test_v1_manifest_of_an_earlier_run_still_verifies(out):
    # What pymerge wrote before version 2: every file hashed whole.
    m = json.loads((out / MANIFEST_NAME).read_text())
    m["version"] = 1
    m["files"] = {rel: {"size": e["size"], "sha256": _sha((out / rel).read_bytes())} for rel, e in m["files"].items()}
    (out / MANIFEST_NAME).write_text(json.dumps(m, indent=1) + "\n")
    report = verify(out)
    assert (report.files, report.tensors) == (len(m["files"]), 3)
    assert _run(out)[0] == 0
    p = _shard(out)
    _flip(p, p.stat().st_size - 5)
    with pytest.raises(CheckpointError, match=rf"{p.name}: sha256 [0-9a-f]{{64}} does not match the manifest"):
        verify(out)
    _flip(p, p.stat().st_size - 5)
    _flip(p, 20)
    with pytest.raises(CheckpointError, match=rf"{p.name}: sha256 [0-9a-f]{{64}} does not match the manifest"):
        verify(out)


def test_v1_manifest_with_per_tensor_hashes_is_not_a_manifest(out):
    _edit_manifest(out, lambda m: m.update(version=1))
    with pytest.raises(CheckpointError, match="not a pymerge manifest"):
        verify(out)


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
