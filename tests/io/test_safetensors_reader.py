"""SafetensorsFile against the safetensors library: every dtype, odd shapes, row views, zero-copy behaviour."""

import math

import pytest
import torch
from safetensors.torch import save_file

from pymerge.errors import CheckpointError
from pymerge.io.safetensors_format import ST_DTYPES, TORCH_TO_ST
from pymerge.io.safetensors_reader import SafetensorsFile
from pymerge.io.safetensors_writer import ShardedWriter, plan_shards

# The dtypes safetensors.torch.save_file knows (it has no float8_e8m0fnu); ours must read them all.
LIB_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.uint16, torch.uint32, torch.uint64, torch.complex64,
]
ODD_SHAPES = [(), (1,), (7,), (3, 5), (13, 1, 3), (2, 3, 5, 7), (0,), (4, 0), (0, 3, 2)]


@pytest.fixture(autouse=True)
def _stay_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written by a relative path lands in tmp_path


def rand(shape, dtype, gen):
    """Random tensor of ``dtype``: full-range bytes for ints, normal values for floats."""
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen).bool().reshape(shape)
    if dtype.is_floating_point or dtype.is_complex:
        return (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype).reshape(shape)
    # Random bytes reinterpreted: covers the full range, including values beyond int64 for uint64.
    raw = torch.randint(0, 256, (n * dtype.itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe) plus equal shape and dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def test_dtype_tables_consistent():
    assert {"BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I8", "U8", "I16", "I32", "I64", "BOOL"} <= set(
        ST_DTYPES
    )
    for name, dt in ST_DTYPES.items():
        assert TORCH_TO_ST[dt] == name


@pytest.mark.parametrize("dtype", LIB_DTYPES, ids=str)
def test_reads_library_files_identically(tmp_path, dtype):
    gen = torch.Generator().manual_seed(100 + LIB_DTYPES.index(dtype))
    tensors = {f"t{i}.weight": rand(s, dtype, gen) for i, s in enumerate(ODD_SHAPES)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "k": "v"})
    with SafetensorsFile(path) as f:
        assert set(f.tensors) == set(tensors)
        assert f.metadata == {"format": "pt", "k": "v"}
        for name, ref in tensors.items():
            info = f.tensors[name]
            assert info.dtype == TORCH_TO_ST[dtype] and info.shape == tuple(ref.shape)
            assert info.nbytes == info.end - info.begin == ref.numel() * ref.element_size()
            assert same_bytes(f.tensor(name), ref), name


def test_rows_views_match_slices(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "a": rand((37, 11), torch.bfloat16, gen),
        "b": rand((5, 3, 7), torch.float32, gen),
        "c": rand((19,), torch.float16, gen),
        "s": rand((), torch.float32, gen),
        "z": rand((6, 0), torch.float32, gen),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    f = SafetensorsFile(tmp_path / "m.safetensors")
    for name, ref in tensors.items():
        n = f.tensors[name].n_rows
        assert n == (ref.shape[0] if ref.dim() else 1)
        ref_rows = ref.reshape(1) if ref.dim() == 0 else ref
        for start in range(n + 1):
            for stop in range(start, n + 1):
                assert same_bytes(f.rows(name, start, stop), ref_rows[start:stop]), (name, start, stop)
    for bad in [(-1, 2), (3, 2), (0, 38)]:
        with pytest.raises(CheckpointError, match="'a'"):
            f.rows("a", *bad)
    with pytest.raises(CheckpointError, match="'nope'"):
        f.tensor("nope")


def test_views_are_zero_copy_private_and_outlive_close(tmp_path):
    ref = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
    path = tmp_path / "m.safetensors"
    save_file({"w": ref}, str(path))
    before = path.read_bytes()
    f = SafetensorsFile(path)
    a = f.tensor("w")
    b = f.rows("w", 10, 20)
    # Both views share the same mapping: b starts 10 rows into a.
    assert b.data_ptr() == a.data_ptr() + 10 * 64 * 4
    a[10, 0] = -1.0  # copy-on-write: visible through the process's mapping only
    assert b[0, 0] == -1.0
    f.close()
    del f
    assert torch.equal(b[1:], ref[11:20]) and torch.equal(a[11:], ref[11:])
    assert path.read_bytes() == before  # the file itself never changes
    assert torch.equal(SafetensorsFile(path).tensor("w"), ref)


def test_misaligned_offset_returns_aligned_copy(tmp_path):
    # 3 bytes of int8 first put the f32 tensor at data offset 3, which is legal but misaligned.
    gen = torch.Generator().manual_seed(2)
    i8 = rand((3,), torch.int8, gen)
    f32 = rand((5, 7), torch.float32, gen)
    f64 = rand((2, 3), torch.float64, gen)
    shards = plan_shards([("i8", "I8", (3,)), ("f32", "F32", (5, 7)), ("f64", "F64", (2, 3))], 1 << 20)
    assert len(shards[0].header) % 8 == 0
    with ShardedWriter(tmp_path, shards) as w:
        w.write("i8", i8)
        w.write("f32", f32)
        w.write("f64", f64)
    f = SafetensorsFile(tmp_path / "model.safetensors")
    for name, ref in [("i8", i8), ("f32", f32), ("f64", f64)]:
        t = f.tensor(name)
        assert t.data_ptr() % t.element_size() == 0
        assert same_bytes(t, ref)
    r = f.rows("f32", 1, 4)
    assert r.data_ptr() % 4 == 0 and same_bytes(r, f32[1:4])


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


def test_views_do_not_read_the_file_eagerly(tmp_path):
    n_tensors, rows, cols = 32, 256, 1024  # 32 MiB of f32
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((rows, cols), float(i)) for i in range(n_tensors)}, str(path))
    f = SafetensorsFile(path)
    base = _rss_file_kb()
    views = [f.tensor(f"t{i}") for i in range(n_tensors)]
    views += [f.rows(f"t{i}", 3, 200) for i in range(n_tensors)]
    after_views = _rss_file_kb()
    assert after_views - base < 4 * 1024, "creating views faulted in file pages"
    total = sum(float(v[:, :1].sum()) + float(v[-1].sum()) for v in views[:n_tensors])
    assert total > 0
    touched = sum(float(v.sum()) for v in views[:n_tensors])
    assert touched == sum(float(i) * rows * cols for i in range(n_tensors))
    assert _rss_file_kb() - base > 24 * 1024, "touching every page should have mapped the file"


def test_empty_file_and_zero_size_only(tmp_path):
    save_file({}, str(tmp_path / "e.safetensors"))
    assert SafetensorsFile(tmp_path / "e.safetensors").tensors == {}
    save_file({"z": torch.zeros(0, 4, dtype=torch.bfloat16)}, str(tmp_path / "z.safetensors"))
    f = SafetensorsFile(tmp_path / "z.safetensors")
    t = f.tensor("z")
    assert t.shape == (0, 4) and t.dtype == torch.bfloat16
    assert f.rows("z", 0, 0).shape == (0, 4)
