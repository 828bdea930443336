"""OutputFile (O_DIRECT middles, buffered edges) and the writer's own sha256 of what it wrote."""

import errno
import hashlib
import os
import random

import pytest
import torch

from pymerge.errors import MergeError
from pymerge.io import direct_write
from pymerge.io.direct_write import ALIGN, OutputFile
from pymerge.io.journal import Journal, TensorCommitter, read_journal
from pymerge.io.safetensors_writer import ShardedWriter, plan_shards


def _direct_works(path) -> bool:
    """Whether this filesystem takes O_DIRECT at all (tmpfs did not before Linux 6.6)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = path / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def _segments(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """Disjoint [start, stop) pieces tiling [0, size): 1 byte to several blocks long, unaligned ends."""
    cuts, at = [], 0
    while at < size:
        n = rng.choice([1, 7, ALIGN - 1, ALIGN, ALIGN + 1, 3 * ALIGN + 513, rng.randrange(1, 9 * ALIGN)])
        cuts.append((at, min(size, at + n)))
        at += n
    return cuts


@pytest.fixture
def spy_direct(monkeypatch):
    """Bytes written through the direct descriptor."""
    seen = {"bytes": 0}
    real = direct_write.OutputFile._write_direct

    def spy(self, data, offset):
        assert offset % ALIGN == 0 and len(data) % ALIGN == 0
        seen["bytes"] += len(data)
        return real(self, data, offset)

    monkeypatch.setattr(direct_write.OutputFile, "_write_direct", spy)
    return seen


@pytest.mark.parametrize("direct", ["1", "0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_pieces_in_random_order_give_the_exact_bytes(tmp_path, monkeypatch, spy_direct, direct, seed):
    monkeypatch.setenv(direct_write.DIRECT_ENV, direct)
    rng = random.Random(seed)
    size = 40 * ALIGN + rng.randrange(ALIGN)
    want = rng.randbytes(size)
    pieces = _segments(size, rng)
    rng.shuffle(pieces)
    path = tmp_path / "f.bin"
    f = OutputFile(path, truncate=True)
    os.ftruncate(f.fd, size)
    for a, b in pieces:
        f.pwrite(memoryview(want)[a:b], a)
    os.fsync(f.fd)
    f.close()
    assert path.read_bytes() == want
    if direct == "1" and _direct_works(tmp_path):
        assert spy_direct["bytes"] > 0  # the test exercised the direct path
    else:
        assert spy_direct["bytes"] == 0


def test_a_small_bounce_buffer_writes_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "BOUNCE_BYTES", 2 * ALIGN)
    monkeypatch.setattr(direct_write, "_bounce", None)
    rng = random.Random(5)
    want = rng.randbytes(11 * ALIGN + 77)
    path = tmp_path / "f.bin"
    f = OutputFile(path, truncate=True)
    f.pwrite(memoryview(want)[:100], 0)
    f.pwrite(memoryview(want)[100:], 100)
    f.close()
    assert path.read_bytes() == want


def test_einval_from_a_direct_write_falls_back_to_buffered(tmp_path, monkeypatch):
    if not _direct_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    real, calls = os.pwrite, []
    f = OutputFile(tmp_path / "f.bin", truncate=True)
    direct_fd = f.direct_fd

    def refuse(fd, data, offset):
        if fd == direct_fd:
            calls.append(offset)
            raise OSError(errno.EINVAL, "alignment")
        return real(fd, data, offset)

    monkeypatch.setattr(direct_write.os, "pwrite", refuse)
    want = random.Random(1).randbytes(5 * ALIGN + 3)
    f.pwrite(memoryview(want)[:2 * ALIGN + 1], 0)
    assert calls and not f.is_direct  # tried once, then the file is buffered
    f.pwrite(memoryview(want)[2 * ALIGN + 1:], 2 * ALIGN + 1)
    assert len(calls) == 1
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == want


def test_a_short_direct_write_is_finished_buffered(tmp_path, monkeypatch):
    if not _direct_works(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    real = os.pwrite
    f = OutputFile(tmp_path / "f.bin", truncate=True)
    direct_fd = f.direct_fd

    def short(fd, data, offset):
        n = real(fd, data, offset)
        return n - 1000 if fd == direct_fd and n > ALIGN else n  # claims less than it wrote, unaligned

    monkeypatch.setattr(direct_write.os, "pwrite", short)
    want = random.Random(2).randbytes(6 * ALIGN)
    f.pwrite(memoryview(want), 0)
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == want


def test_direct_io_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(direct_write.DIRECT_ENV, "0")
    f = OutputFile(tmp_path / "a", truncate=True)
    assert not f.is_direct
    f.close()
    monkeypatch.setenv(direct_write.DIRECT_ENV, "maybe")
    with pytest.raises(MergeError, match="PYMERGE_DIRECT_IO"):
        OutputFile(tmp_path / "b", truncate=True)


def _writer(tmp_path, shapes):
    shards = plan_shards([(n, "BF16", s) for n, s in shapes.items()], 1 << 30)
    return ShardedWriter(tmp_path, shards), shards


def test_digest_of_rows_written_in_order_is_the_files_sha256(tmp_path):
    w, _ = _writer(tmp_path, {"a": (37, 301), "b": (0, 5), "c": (9,)})
    a = torch.randn(37, 301).to(torch.bfloat16)
    for lo, hi in [(0, 5), (5, 6), (6, 37)]:
        w.write("a", a[lo:hi].contiguous(), row_start=lo)
    w.write("c", torch.randn(9).to(torch.bfloat16))
    w.write("b", torch.zeros(0, 5, dtype=torch.bfloat16))
    assert w.digest("a") == hashlib.sha256(a.view(torch.uint8).numpy().tobytes()).hexdigest()
    assert w.digest("b") == hashlib.sha256(b"").hexdigest()
    w.close()


@pytest.mark.parametrize("order", [[(6, 37), (0, 6)], [(0, 6), (0, 6), (6, 37)], [(0, 6)]])
def test_no_digest_when_rows_came_out_of_order_twice_or_not_all(tmp_path, order):
    w, _ = _writer(tmp_path, {"a": (37, 301)})
    a = torch.randn(37, 301).to(torch.bfloat16)
    for lo, hi in order:
        w.write("a", a[lo:hi].contiguous(), row_start=lo)
    assert w.digest("a") is None
    w.abort()


def test_committer_reads_back_what_the_writer_could_not_hash(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    w, shards = _writer(out, {"a": (37, 301), "b": (50, 77)})
    tensors = {"a": torch.randn(37, 301).to(torch.bfloat16), "b": torch.randn(50, 77).to(torch.bfloat16)}
    asked = []

    def digests(name):
        asked.append(name)
        return w.digest(name)

    committer = TensorCommitter(out, shards, Journal(tmp_path / "j.jsonl"), digests=digests)
    w.write("a", tensors["a"][10:].contiguous(), row_start=10)  # out of order: read back
    w.write("a", tensors["a"][:10].contiguous(), row_start=0)
    w.write("b", tensors["b"])
    committer.tensor_done("a")
    committer.tensor_done("b")
    committer.close()
    w.close()
    entries = read_journal(tmp_path / "j.jsonl")
    for name, t in tensors.items():
        assert entries[name].sha256 == hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest(), name
    assert sorted(asked) == ["a", "b"]
