"""One hand-crafted hostile file per header validation rule; each must raise CheckpointError naming the culprit."""

import json
import struct

import pytest

from pymerge.errors import CheckpointError
from pymerge.io.safetensors_format import MAX_HEADER_BYTES
from pymerge.io.safetensors_reader import SafetensorsFile


@pytest.fixture(autouse=True)
def _stay_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def craft(path, header, data=b"", *, header_len=None):
    """Write a safetensors-shaped file: ``header`` (object → JSON, or raw bytes), then ``data``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def good_header():
    # Two F32 tensors: a (2, 3) at [0, 24) and b (4,) at [24, 40); 40 data bytes.
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
    }


def expect_error(path, *needles):
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(path)
    msg = str(ei.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def test_baseline_crafted_file_is_valid(tmp_path):
    # Guards the tests below: each one breaks exactly one thing in this otherwise-valid file.
    f = SafetensorsFile(craft(tmp_path / "ok.safetensors", good_header(), bytes(40)))
    assert list(f.tensors) == ["a", "b"] and f.tensor("a").shape == (2, 3)
    h = good_header()
    h["a"], h["b"] = h["b"], h["a"]  # JSON order differs from offset order: still valid
    h["a"]["data_offsets"], h["b"]["data_offsets"] = [0, 16], [16, 40]
    f = SafetensorsFile(craft(tmp_path / "ok2.safetensors", h, bytes(40)))
    assert f.tensors["a"].shape == (4,)


def test_file_shorter_than_length_prefix(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x01\x02\x03")
    expect_error(p, "too small")


def test_huge_header_length(tmp_path):
    expect_error(craft(tmp_path / "x.safetensors", b"{}", header_len=2**62), "exceeds")
    expect_error(craft(tmp_path / "y.safetensors", b"{}", header_len=MAX_HEADER_BYTES + 1), "exceeds")


def test_header_past_eof(tmp_path):
    expect_error(craft(tmp_path / "x.safetensors", b"{}", header_len=1000), "past the end")


def test_invalid_utf8(tmp_path):
    expect_error(craft(tmp_path / "x.safetensors", b'{"\xff\xfe": 1}'), "UTF-8")


def test_invalid_json(tmp_path):
    expect_error(craft(tmp_path / "x.safetensors", b'{"a": '), "JSON")


@pytest.mark.parametrize("raw", [b"[]", b"3", b'"str"', b"null"])
def test_non_object_json(tmp_path, raw):
    expect_error(craft(tmp_path / "x.safetensors", raw), "JSON object")


def test_duplicate_tensor_name(tmp_path):
    raw = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
        b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'
    )
    expect_error(craft(tmp_path / "x.safetensors", raw, bytes(8)), "duplicate key 'a'")


@pytest.mark.parametrize("meta", [{"format": 1}, {"format": None}, {"k": ["pt"]}])
def test_metadata_value_not_str(tmp_path, meta):
    h = good_header()
    h["__metadata__"] = meta
    key = next(iter(meta))
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "__metadata__", repr(key))


def test_metadata_not_object(tmp_path):
    h = good_header()
    h["__metadata__"] = ["format", "pt"]
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "__metadata__")


def test_entry_not_object(tmp_path):
    h = good_header()
    h["b"] = [24, 40]
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "'b'", "object")


@pytest.mark.parametrize("key", ["dtype", "shape", "data_offsets"])
def test_entry_missing_key(tmp_path, key):
    h = good_header()
    del h["b"][key]
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "'b'", repr(key))


@pytest.mark.parametrize("dtype", ["F4", "f32", "XYZ", 7, None])
def test_bad_dtype(tmp_path, dtype):
    h = good_header()
    h["b"]["dtype"] = dtype
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "'b'", "dtype")


@pytest.mark.parametrize("shape", [[-4], [-2, -2], [4.0], [True, 4], ["4"], 4, None, [2, -2]])
def test_bad_shape(tmp_path, shape):
    # [-2, -2] has numel 4, matching the 16 bytes of its offsets: only the sign check catches it.
    h = good_header()
    h["b"]["shape"] = shape
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "'b'", "shape must be a list of non-negative")


@pytest.mark.parametrize("offsets", [[24], [24, 40, 56], [-8, 40], [24.0, 40], [24, "40"], None, [40, 24]])
def test_bad_offsets(tmp_path, offsets):
    h = good_header()
    h["b"]["data_offsets"] = offsets
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "'b'", "data_offsets")


def test_size_does_not_match_shape(tmp_path):
    h = good_header()
    h["b"]["shape"] = [5]  # 20 bytes, but the offsets span 16
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(40)), "'b'", "needs 20")


def test_overlapping_offsets(tmp_path):
    h = good_header()
    h["b"]["data_offsets"] = [20, 36]  # starts inside a
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(36)), "'b'", "overlap")


def test_two_tensors_aliasing_same_bytes(tmp_path):
    h = good_header()
    h["b"] = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(24)), "overlap")


def test_hole_between_tensors(tmp_path):
    h = good_header()
    h["b"]["data_offsets"] = [28, 44]
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(44)), "'b'", "hole")


def test_hole_at_start(tmp_path):
    h = good_header()
    h["a"]["data_offsets"] = [8, 32]
    h["b"]["data_offsets"] = [32, 48]
    expect_error(craft(tmp_path / "x.safetensors", h, bytes(48)), "'a'", "hole")


def test_data_region_shorter_than_declared(tmp_path):
    expect_error(craft(tmp_path / "x.safetensors", good_header(), bytes(39)), "'b'", "past the end")


def test_data_region_longer_than_declared(tmp_path):
    expect_error(craft(tmp_path / "x.safetensors", good_header(), bytes(41)), "trailing")


def test_error_is_a_pymerge_error(tmp_path):
    from pymerge.errors import PymergeError

    with pytest.raises(PymergeError):
        SafetensorsFile(craft(tmp_path / "x.safetensors", b"[]"))
    with pytest.raises(CheckpointError, match="cannot read"):
        SafetensorsFile(tmp_path / "missing.safetensors")
