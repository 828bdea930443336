"""plan_shards layouts and ShardedWriter round trips through safetensors.torch and our own reader."""

import json
import math
import random
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from pymerge.errors import MergeError
from pymerge.io.checkpoint import Checkpoint
from pymerge.io.safetensors_format import ST_ITEMSIZE, TORCH_TO_ST
from pymerge.io.safetensors_reader import SafetensorsFile
from pymerge.io.safetensors_writer import ShardedWriter, plan_shards


@pytest.fixture(autouse=True)
def _stay_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def specs(tensors):
    return [(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def rand_model(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "embed": r(37, 13).to(torch.bfloat16),
        "scalar": r(()).to(torch.float32),
        "empty_rows": torch.zeros(0, 5, dtype=torch.float16),
        "empty_cols": torch.zeros(6, 0, dtype=torch.bfloat16),
        "l0.w": r(29, 17).to(torch.float16),
        "l0.b": r(17).to(torch.float32),
        "l1.w": r(3, 5, 7).to(torch.bfloat16),
        "ids": torch.randint(-(2**40), 2**40, (9,), generator=g),
        "mask": torch.randint(0, 2, (4, 3), generator=g).bool(),
        "l2.w": r(41, 3).to(torch.float32),
        "odd_i8": torch.randint(-128, 128, (5,), generator=g, dtype=torch.int8),
        "after_odd": r(7, 2).to(torch.float32),  # misaligned start: exercises the reader's copy path
    }


def test_plan_single_shard_layout():
    t = rand_model(0)
    (shard,) = plan_shards(specs(t), max_shard_bytes=1 << 30)
    assert shard.filename == "model.safetensors"
    assert [o.name for o in shard.tensors] == list(t)
    offset = 0
    for o in shard.tensors:  # in order, packed back to back
        assert o.offset == offset
        offset += math.prod(o.shape) * ST_ITEMSIZE[o.dtype]
    assert shard.data_size == offset == sum(x.numel() * x.element_size() for x in t.values())
    assert len(shard.header) % 8 == 0
    hdr = json.loads(shard.header)
    assert hdr["__metadata__"] == {"format": "pt"}
    b = next(o for o in shard.tensors if o.name == "l0.b")
    assert hdr["l0.b"] == {"dtype": "F32", "shape": [17], "data_offsets": [b.offset, b.offset + 17 * 4]}
    assert shard.file_size == 8 + len(shard.header) + shard.data_size


def test_plan_greedy_packing_and_names():
    # 100-byte tensors with a 250-byte cap: 2 per shard; the 400-byte one goes alone.
    ts = [("a", "F32", (25,)), ("b", "F32", (25,)), ("c", "F32", (25,)), ("big", "F32", (100,)),
          ("d", "U8", (100,)), ("e", "U8", (0,))]
    shards = plan_shards(ts, max_shard_bytes=250, metadata={"merged_by": "pymerge"})
    assert [[o.name for o in s.tensors] for s in shards] == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert [s.filename for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert all(s.data_size <= 250 or len(s.tensors) == 1 for s in shards)
    assert json.loads(shards[0].header)["__metadata__"] == {"merged_by": "pymerge", "format": "pt"}
    # An oversized first tensor opens no empty shard before it.
    shards = plan_shards([("big", "F32", (100,)), ("a", "F32", (25,))], max_shard_bytes=250)
    assert [[o.name for o in s.tensors] for s in shards] == [["big"], ["a"]]


def test_plan_rejects_bad_input():
    with pytest.raises(MergeError, match="'a' is listed twice"):
        plan_shards([("a", "F32", (1,)), ("a", "F32", (1,))], 100)
    with pytest.raises(MergeError, match="dtype 'F99'"):
        plan_shards([("a", "F99", (1,))], 100)
    with pytest.raises(MergeError, match="negative"):
        plan_shards([("a", "F32", (-1,))], 100)
    with pytest.raises(MergeError, match="reserved"):
        plan_shards([("__metadata__", "F32", (1,))], 100)


def write_in_random_row_chunks(w, tensors, rng):
    """Write every tensor as random row ranges, all tensors interleaved in a random order."""
    jobs = []
    for name, t in tensors.items():
        if t.dim() == 0:
            jobs.append((name, t, 0))
            continue
        n, start = t.shape[0], 0
        while True:
            stop = min(n, start + rng.randint(1, 7))
            jobs.append((name, t[start:stop].contiguous(), start))
            if stop >= n:
                break
            start = stop
    rng.shuffle(jobs)
    for name, data, start in jobs:
        w.write(name, data, row_start=start)


@pytest.mark.parametrize("cap", [1 << 30, 700, 1])
def test_roundtrip_through_library_and_our_reader(tmp_path, cap):
    t = rand_model(cap)
    shards = plan_shards(specs(t), max_shard_bytes=cap)
    w = ShardedWriter(tmp_path, shards)
    write_in_random_row_chunks(w, t, random.Random(cap))
    assert w.written_fraction == 1.0 and w.missing() == []
    w.close()
    index = w.write_index()
    if len(shards) == 1:
        assert index is None and not (tmp_path / "model.safetensors.index.json").exists()
    else:
        assert index == tmp_path / "model.safetensors.index.json"
        idx = json.loads(index.read_text())
        assert idx["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in t.values())
        assert idx["weight_map"] == {o.name: s.filename for s in shards for o in s.tensors}

    loaded = {}
    for s in shards:
        path = tmp_path / s.filename
        assert path.stat().st_size == s.file_size
        lib = load_file(str(path))
        ours = SafetensorsFile(path)
        assert ours.metadata == {"format": "pt"}
        assert list(ours.tensors) == [o.name for o in s.tensors]
        for name in lib:
            assert torch.equal(lib[name], ours.tensor(name))
        loaded.update(lib)
    assert set(loaded) == set(t)
    for name, ref in t.items():
        assert loaded[name].dtype == ref.dtype and loaded[name].shape == ref.shape
        assert torch.equal(loaded[name], ref), name
    ck = Checkpoint.open(tmp_path)
    for name, ref in t.items():
        assert torch.equal(ck.tensor(name), ref)


def test_flat_chunks_and_threaded_writes(tmp_path):
    g = torch.Generator().manual_seed(7)
    t = {f"w{i}": torch.randn(53, 19, generator=g).to(torch.bfloat16) for i in range(6)}
    w = ShardedWriter(tmp_path, plan_shards(specs(t), max_shard_bytes=5000))
    jobs = [(n, x[s : s + 5].reshape(-1).contiguous(), s) for n, x in t.items() for s in range(0, 53, 5)]
    random.Random(3).shuffle(jobs)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: w.write(j[0], j[1], row_start=j[2]), jobs))
    w.close()
    w.write_index()
    ck = Checkpoint.open(tmp_path)
    for n, x in t.items():
        assert torch.equal(ck.tensor(n), x)


def test_write_validation(tmp_path):
    shards = plan_shards([("a", "BF16", (4, 3)), ("s", "F32", ())], 1 << 20)
    w = ShardedWriter(tmp_path, shards)
    with pytest.raises(MergeError, match="'nope'"):
        w.write("nope", torch.zeros(1))
    with pytest.raises(MergeError, match="'a'.*dtype"):
        w.write("a", torch.zeros(4, 3))
    with pytest.raises(MergeError, match="'a'.*out of range"):
        w.write("a", torch.zeros(2, 3, dtype=torch.bfloat16), row_start=3)
    with pytest.raises(MergeError, match="'a'.*out of range"):
        w.write("a", torch.zeros(1, 3, dtype=torch.bfloat16), row_start=-1)
    with pytest.raises(MergeError, match="'a'.*whole number of rows"):
        w.write("a", torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(MergeError, match="'a'.*whole number of rows"):
        w.write("a", torch.zeros(5, dtype=torch.bfloat16))
    with pytest.raises(MergeError, match="'a'.*contiguous"):
        w.write("a", torch.zeros(3, 4, dtype=torch.bfloat16).t())
    w.write("a", torch.ones(2, 3, dtype=torch.bfloat16), row_start=2)
    assert not w.is_complete("a") and w.written_fraction == pytest.approx(12 / 28)
    w.write("s", torch.tensor(2.5))
    # Rows 0..1 of 'a' are missing: close names it, still closes the files.
    with pytest.raises(MergeError, match="'a' in model.safetensors was not fully written.*2 of 4 rows"):
        w.close()
    with pytest.raises(MergeError, match="closed"):
        w.write("a", torch.ones(2, 3, dtype=torch.bfloat16))


def test_header_bytes_on_disk(tmp_path):
    shards = plan_shards([("x", "F16", (3,))], 1 << 20)
    with ShardedWriter(tmp_path, shards) as w:
        w.write("x", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16))
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n == len(shards[0].header) and n % 8 == 0
    assert raw[8 : 8 + n] == shards[0].header
    assert raw[8 + n :] == torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16).numpy().tobytes()


def test_context_manager_abort_on_error_leaves_no_fds(tmp_path):
    shards = plan_shards([("x", "F32", (3,))], 1 << 20)
    with pytest.raises(RuntimeError):
        with ShardedWriter(tmp_path, shards) as w:
            raise RuntimeError("boom")
    assert w._files == []  # closed without the completeness check


def test_empty_layout(tmp_path):
    (shard,) = plan_shards([], 100)
    with ShardedWriter(tmp_path, [shard]):
        pass
    assert load_file(str(tmp_path / "model.safetensors")) == {}
