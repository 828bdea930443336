"""Hostile inputs, fuzzed: mutated safetensors files and index files either open cleanly or raise CheckpointError.

Property, for every mutation: ``Checkpoint.open`` succeeds and then every tensor reads (whole and by rows) with
its declared dtype and shape, or it raises ``CheckpointError``. Never another exception, never a hang (a hard
per-example alarm), never an absurd allocation (a cap on Python allocations while opening). Seeds are real
files written by ``safetensors.torch.save_file``.

Bounded for CI (derandomized, ~200 examples per property); ``PYMERGE_FUZZ_EXAMPLES=5000`` runs more, with
fresh randomness, locally.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import struct
import tracemalloc
from datetime import timedelta
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from pymerge.errors import CheckpointError  # noqa: E402
from pymerge.io.checkpoint import Checkpoint  # noqa: E402

_EXAMPLES = int(os.environ.get("PYMERGE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=_EXAMPLES,
    deadline=timedelta(seconds=2),  # each example is milliseconds of work; seconds means something is wrong
    derandomize="PYMERGE_FUZZ_EXAMPLES" not in os.environ,  # CI runs the same examples every time
    database=None,  # no .hypothesis/ directory in the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)
HANG_SECONDS = 10
ALLOC_CAP = 64 * 2**20  # opening a file of a few KB must not allocate anywhere near this


# ------------------------------------------------------------------------------------------------ seed files


def _seed_tensors(offset: int = 0) -> dict[str, torch.Tensor]:
    """Mixed dtypes and layouts: odd sizes, a 0-d tensor, an empty tensor, unaligned offsets after I8."""
    g = torch.Generator().manual_seed(11 + offset)
    return {
        f"m{offset}.w": torch.randn(3, 5, generator=g),
        f"m{offset}.b": torch.randn(7, generator=g).to(torch.bfloat16),
        f"m{offset}.flags": torch.randint(-5, 5, (3,), generator=g, dtype=torch.int8),
        f"m{offset}.h": torch.randn(2, 1, 3, generator=g).to(torch.float16),
        f"m{offset}.scalar": torch.tensor(2.5, dtype=torch.float64),
        f"m{offset}.empty": torch.empty(0, 4),
        f"m{offset}.ids": torch.arange(5, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Bytes of a single-file checkpoint, and the shard bytes + index of a two-shard one."""
    root = tmp_path_factory.mktemp("fuzz_seeds")
    save_file(_seed_tensors(), str(root / "one.safetensors"), metadata={"format": "pt"})
    shards = {}
    weight_map = {}
    for i in range(2):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        tensors = _seed_tensors(i)
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        shards[name] = (root / name).read_bytes()
        weight_map.update({n: name for n in tensors})
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    return _Seeds(single=(root / "one.safetensors").read_bytes(), shards=shards, index=index)


class _Seeds(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example; keep that readable
        return "<seed files>"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz_work")


_counter = itertools.count()


def _fresh_dir(workdir: Path) -> Path:
    # A new path per example: a file still mapped by a previous example's views must never be rewritten.
    d = workdir / f"ex{next(_counter)}"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------------------------ property


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int):
    """Raise _Hang in the main thread if the block runs longer than ``seconds`` (no-op without SIGALRM)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def on_alarm(signum, frame):
        raise _Hang(f"example ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def open_and_read_all(path: Path) -> str:
    """The property: 'ok' if every tensor reads as declared, 'rejected' on CheckpointError; anything else fails."""
    with _alarm(HANG_SECONDS):
        tracemalloc.start()
        try:
            ck = Checkpoint.open(path)
        except CheckpointError as e:
            assert str(e), "a CheckpointError must say what is wrong"
            return "rejected"
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < ALLOC_CAP, f"opening allocated {peak} bytes"
        try:
            for name in ck.names():
                info = ck.info(name)
                t = ck.tensor(name)
                assert tuple(t.shape) == info.shape and t.dtype == info.torch_dtype, name
                assert t.numel() * t.element_size() == info.end - info.begin, name
                t.clone()  # touch every byte: no SIGBUS, no read past the mapping
                r = ck.rows(name, 0, info.n_rows)
                assert r.shape[0] == info.n_rows and r.numel() == t.numel(), name
        finally:
            ck.close()
        return "ok"


# ------------------------------------------------------------------------------------------------ strategies

WEIRD_INTS = st.sampled_from([0, 1, 2, 7, 8, -1, -8, 2**31, 2**32 + 3, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
                              2**64, 2**64 + 8, 10**30, -(2**63), 100_000_001])
INTS = WEIRD_INTS | st.integers(-50, 300)
SCALARS = (st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=6)
           | st.sampled_from(["F32", "BF16", "F16", "I8", "F64", "U8", "BOOL", "f32", "F8_E4M3", "", "C64"]))
JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c,
                                                                                         max_size=3),
                           max_leaves=8)
SHAPES = st.lists(INTS, max_size=4) | JSON_VALUES
OFFSETS = st.lists(INTS, min_size=0, max_size=3) | JSON_VALUES
NAMES = st.sampled_from(["__metadata__", "", "m0.w", "m1.w", "x" * 300]) | st.text(max_size=8)


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    raw = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + body


@st.composite
def json_mutation(draw, header: dict, body: bytes) -> tuple[object, bytes]:
    """Apply 1-3 JSON-level edits to a parsed header (and maybe the data length)."""
    h: object = json.loads(json.dumps(header))
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(h, dict):
            break
        names = [k for k in h if k != "__metadata__"] or ["x"]
        name = draw(st.sampled_from(names))
        entry = h.get(name)
        op = draw(st.sampled_from(["dtype", "shape", "offsets", "shape+offsets", "del_field", "extra_key",
                                   "del_tensor", "rename", "replace_entry", "metadata", "swap_offsets",
                                   "empty_tensor", "body", "whole"]))
        if op in ("dtype", "shape", "offsets", "del_field", "extra_key") and not isinstance(entry, dict):
            op = "replace_entry"
        if op == "dtype":
            entry["dtype"] = draw(SCALARS | JSON_VALUES)
        elif op == "shape":
            entry["shape"] = draw(SHAPES)
        elif op == "offsets":
            entry["data_offsets"] = draw(OFFSETS)
        elif op == "shape+offsets" and isinstance(entry, dict):
            # A self-consistent entry (size matches the shape) that may still clash with its neighbours.
            shape = draw(st.lists(INTS, max_size=4))
            begin = draw(INTS)
            entry["shape"] = shape
            size = 4
            for d in shape:
                size *= d
            entry["dtype"], entry["data_offsets"] = "F32", [begin, begin + size]
        elif op == "del_field":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "extra_key":
            entry[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        elif op == "del_tensor":
            h.pop(name, None)
        elif op == "rename":
            h[draw(NAMES)] = h.pop(name, None)
        elif op == "replace_entry":
            h[name] = draw(JSON_VALUES)
        elif op == "metadata":
            h["__metadata__"] = draw(JSON_VALUES)
        elif op == "swap_offsets":
            other = h.get(draw(st.sampled_from(names)))
            if isinstance(entry, dict) and isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
        elif op == "empty_tensor":
            # Zero elements at a boundary of the data region: valid for the tiling, with any other dims.
            at = draw(st.sampled_from([0, len(body)]))
            dims = draw(st.lists(INTS, max_size=3))
            dims.insert(draw(st.integers(0, len(dims))), 0)
            h[draw(NAMES)] = {"dtype": draw(st.sampled_from(["F32", "BF16", "I8"])), "shape": dims,
                              "data_offsets": [at, at]}
        elif op == "body":
            cut = draw(st.integers(-len(body), 16))
            body = body[:cut] if cut < 0 else body + bytes(cut)
        else:
            h = draw(JSON_VALUES)
    return h, body


@st.composite
def byte_mutation(draw, data: bytes) -> bytes:
    """Flip, insert, delete or truncate bytes in the length prefix + header region."""
    (n,) = struct.unpack("<Q", data[:8])
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        end = min(len(buf), 8 + n + 4)
        pos = draw(st.integers(0, max(end - 1, 0)))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[pos] = draw(st.sampled_from([0, 0x22, 0x2C, 0x5B, 0x5D, 0x7B, 0x7D, 0x30, 0x39, 0xFF, 0xC3, 0x80]))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del buf[pos:pos + draw(st.integers(1, 8))]
        else:
            del buf[pos:]
    return bytes(buf)


# ------------------------------------------------------------------------------------------------ properties


@FUZZ
@given(data=st.data())
def test_byte_mutations_of_a_safetensors_header(seeds, workdir, data):
    mutated = data.draw(byte_mutation(seeds["single"]))
    path = _fresh_dir(workdir) / "model.safetensors"
    path.write_bytes(mutated)
    event(open_and_read_all(path))  # --hypothesis-show-statistics: how many mutants still open
    path.unlink()


@FUZZ
@given(data=st.data())
def test_json_mutations_of_a_safetensors_header(seeds, workdir, data):
    header, body = _split(seeds["single"])
    h, body = data.draw(json_mutation(header, body))
    path = _fresh_dir(workdir) / "model.safetensors"
    path.write_bytes(_join(h, body))
    event(open_and_read_all(path))
    path.unlink()


PATHS = st.sampled_from([
    "../model-00001-of-00002.safetensors", "/etc/passwd.safetensors", "./model-00001-of-00002.safetensors",
    "sub/../model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors/", "nul\x00.safetensors",
    "x" * 300 + ".safetensors", ("d/" * 200) + "m.safetensors", "model.bin", "", ".", "..", "\ud800.safetensors",
    "model-00003-of-00002.safetensors", "MODEL-00001-OF-00002.SAFETENSORS", "model-00001-of-00002.safetensors ",
]) | st.text(max_size=12)


@st.composite
def index_mutation(draw, index: dict) -> object:
    """Edits to ``weight_map`` paths and names, and to the index structure."""
    idx: object = json.loads(json.dumps(index))
    shards = sorted(set(index["weight_map"].values()))
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(idx, dict):
            break
        wm = idx.get("weight_map")
        op = draw(st.sampled_from(["path", "retarget", "del_name", "add_name", "value_type", "weight_map",
                                   "metadata", "extra_key", "del_weight_map", "whole"]))
        if op in ("path", "retarget", "del_name", "add_name", "value_type") and not (isinstance(wm, dict) and wm):
            op = "weight_map"
        if op == "path":
            wm[draw(st.sampled_from(sorted(wm)))] = draw(PATHS)
        elif op == "retarget":
            wm[draw(st.sampled_from(sorted(wm)))] = draw(st.sampled_from(shards))
        elif op == "del_name":
            wm.pop(draw(st.sampled_from(sorted(wm))))
        elif op == "add_name":
            wm[draw(NAMES)] = draw(st.sampled_from(shards) | PATHS)
        elif op == "value_type":
            wm[draw(st.sampled_from(sorted(wm)))] = draw(JSON_VALUES)
        elif op == "weight_map":
            idx["weight_map"] = draw(JSON_VALUES)
        elif op == "metadata":
            idx["metadata"] = draw(JSON_VALUES)
        elif op == "extra_key":
            idx[draw(st.text(max_size=6))] = draw(JSON_VALUES)
        elif op == "del_weight_map":
            idx.pop("weight_map", None)
        else:
            idx = draw(JSON_VALUES)
    return idx


@FUZZ
@given(data=st.data())
def test_index_mutations(seeds, workdir, data):
    d = _fresh_dir(workdir)
    for name, raw in seeds["shards"].items():
        (d / name).write_bytes(raw)
    (d / "sub").mkdir()
    index = data.draw(index_mutation(seeds["index"]))
    text = json.dumps(index).encode("utf-8", "surrogatepass")
    if data.draw(st.booleans()):
        text = data.draw(byte_mutation(struct.pack("<Q", len(text)) + text))[8:]  # raw edits of the JSON text
    (d / "model.safetensors.index.json").write_bytes(text)
    via = data.draw(st.sampled_from(["dir", "index"]))
    event(open_and_read_all(d if via == "dir" else d / "model.safetensors.index.json"))


# ------------------------------------------------------------------------------------------ found by fuzzing


def _craft(path: Path, header: bytes, body: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    return path


def test_seed_files_open(seeds, workdir):
    # Guards the properties above: unmutated seeds must open and read (else every example is just "rejected").
    d = _fresh_dir(workdir)
    (d / "model.safetensors").write_bytes(seeds["single"])
    assert open_and_read_all(d / "model.safetensors") == "ok"
    d = _fresh_dir(workdir)
    for name, raw in seeds["shards"].items():
        (d / name).write_bytes(raw)
    (d / "model.safetensors.index.json").write_text(json.dumps(seeds["index"]))
    assert open_and_read_all(d) == "ok"


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000])
def test_deeply_nested_json_is_rejected(workdir, seeds, text):
    # json.loads raises RecursionError (not a ValueError) past ~1000 levels; found for headers and indexes.
    d = _fresh_dir(workdir)
    _craft(d / "model.safetensors", text.encode())
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Checkpoint.open(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    for name, raw in seeds["shards"].items():
        (d / name).write_bytes(raw)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="index JSON is nested too deeply"):
        Checkpoint.open(d)


@pytest.mark.parametrize("shape", [[0, 2**63], [2**62, 2**62, 0], [0, 2**64 + 8], [3, 0, 10**30]])
def test_empty_tensor_with_dimensions_beyond_int64_is_rejected(workdir, shape):
    # Zero elements pass the byte-count check whatever the other dims; torch then failed with TypeError /
    # RuntimeError building the shape. Found by test_json_mutations_of_a_safetensors_header.
    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = _craft(_fresh_dir(workdir) / "model.safetensors", header)
    with pytest.raises(CheckpointError, match=r"tensor 't': shape .* is larger than a tensor can be"):
        Checkpoint.open(path)


def test_largest_valid_empty_shape_still_reads(workdir):
    header = json.dumps({"t": {"dtype": "F32", "shape": [0, 2**63 - 1], "data_offsets": [0, 0]}}).encode()
    assert open_and_read_all(_craft(_fresh_dir(workdir) / "model.safetensors", header)) == "ok"


def test_huge_shape_list_is_rejected_fast_with_a_short_message(workdir):
    # 200k dims of 2**62: the product must stop at the bound, and the error must not quote all of it.
    header = json.dumps({"t": {"dtype": "F32", "shape": [2**62] * 200_000, "data_offsets": [0, 0]}}).encode()
    path = _craft(_fresh_dir(workdir) / "model.safetensors", header)
    with _alarm(HANG_SECONDS), pytest.raises(CheckpointError) as ei:
        Checkpoint.open(path)
    assert len(str(ei.value)) < 600


@pytest.mark.parametrize("name", ["x" * 300 + ".safetensors", "d" * 5000 + "/m.safetensors"])
def test_shard_name_too_long_for_the_filesystem(workdir, seeds, name):
    # Path.is_file() raises OSError(ENAMETOOLONG) instead of returning False. Found by test_index_mutations.
    d = _fresh_dir(workdir)
    for shard, raw in seeds["shards"].items():
        (d / shard).write_bytes(raw)
    index = json.loads(json.dumps(seeds["index"]))
    index["weight_map"]["m0.w"] = name
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="cannot access"):
        Checkpoint.open(d)


def test_oversized_index_is_not_read(workdir):
    d = _fresh_dir(workdir)
    with open(d / "model.safetensors.index.json", "wb") as f:
        f.truncate(200_000_000)  # sparse: costs no disk, and must not be read into memory
    with pytest.raises(CheckpointError, match="over the 100000000-byte limit"):
        Checkpoint.open(d)
