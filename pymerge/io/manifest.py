"""``pymerge_manifest.json``: what a finished output holds (each file's size and sha256, each tensor), and the
check that an output directory still matches it.

The manifest is written last, into the temporary output directory before it is renamed into place, so it
describes exactly the files the merge produced. ``verify_output`` re-reads everything: it catches a copy that
was truncated, a flipped byte, a deleted index, or a stray shard left from another model.

Version 2 hashes a shard in pieces instead of whole: its header region (the first ``8 + len(header)`` bytes)
and each tensor's byte range. The tensor hashes are the resume journal's (``io/journal.py``), which the merge
computes anyway as it writes each tensor, so each output byte is hashed once per merge, not twice. The pieces
tile the file (a safetensors file has no bytes outside its header and tensors: the writer packs tensors back to
back and the reader rejects holes), so every byte is still covered by a hash. Other files
are small and keep one whole-file sha256, as in version 1, which ``verify_output`` still reads.

Version 2 file entries, by path relative to the output directory::

    {"size": N, "sha256": H}                                            hashed whole
    {"size": N, "header": {"length": L, "sha256": H},                   a shard: bytes [0, L), then each
     "tensors": {name: {"offset": O, "length": K, "sha256": H}, ...}}   tensor's [O, O + K), tiling [0, N)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymerge.errors import CheckpointError, MergeError
from pymerge.io.journal import JournalEntry, sha256_range
from pymerge.io.safetensors_reader import SafetensorsFile
from pymerge.io.safetensors_writer import INDEX_NAME, ShardLayout

log = logging.getLogger("pymerge")

MANIFEST_NAME = "pymerge_manifest.json"
MANIFEST_FORMAT = "pymerge-manifest"
MANIFEST_VERSION = 2  # what write_manifest writes
READABLE_VERSIONS = (1, 2)  # what verify_output checks: outputs of earlier pymerge versions stay verifiable


def _hash_ranges(ranges: list[tuple[Path, int, int]]) -> list[str | None]:
    """sha256 of each ``(path, offset, length)`` byte range (None where the file ends before the range ends),
    several ranges at a time: large ones are CPU-bound and hashlib releases the GIL while hashing."""
    fds: dict[Path, int] = {}
    try:
        for path, _, _ in ranges:
            if path not in fds:
                fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

        def one(r: tuple[Path, int, int]) -> str | None:
            return sha256_range(fds[r[0]], r[1], r[2])

        workers = max(1, min(len(ranges), os.cpu_count() or 1, 8))
        if workers == 1:
            return [one(r) for r in ranges]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, ranges))
    finally:
        for fd in fds.values():
            os.close(fd)


def _output_files(out_dir: Path) -> list[Path]:
    """Every regular file under ``out_dir`` except the manifest, as sorted relative paths."""
    files = []
    for dirpath, _dirs, names in os.walk(out_dir):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(out_dir)
            if rel.as_posix() != MANIFEST_NAME and (out_dir / rel).is_file():
                files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def _shard_entry(shard: ShardLayout, size: int, known: Mapping[str, JournalEntry]) -> dict[str, Any] | None:
    """The version-2 entry of ``shard`` with its tensors' hashes taken from ``known`` (the header's hash left to
    fill in), or None when the shard must be hashed whole: a tensor without a matching journal entry, or a
    file or layout whose pieces do not tile it (neither happens in a merge; the fallback keeps it correct)."""
    header_len = 8 + len(shard.header)
    if size != shard.file_size:
        log.debug("manifest: %s is %d bytes, its layout says %d; hashing it whole", shard.filename, size,
                  shard.file_size)
        return None
    tensors: dict[str, dict[str, Any]] = {}
    pos = header_len
    for t in sorted(shard.tensors, key=lambda t: (t.offset, t.nbytes)):
        begin = header_len + t.offset
        e = known.get(t.name)
        if e is None or (e.shard, e.offset, e.length) != (shard.filename, begin, t.nbytes):
            log.debug("manifest: no journal hash for tensor %r at [%d, %d) of %s; hashing the shard whole", t.name,
                      begin, begin + t.nbytes, shard.filename)
            return None
        if begin != pos:
            log.debug("manifest: %s has bytes [%d, %d) outside every tensor; hashing it whole", shard.filename,
                      pos, begin)
            return None
        tensors[t.name] = {"offset": begin, "length": t.nbytes, "sha256": e.sha256}
        pos = begin + t.nbytes
    if pos != size:
        log.debug("manifest: %s has bytes [%d, %d) after its last tensor; hashing it whole", shard.filename, pos,
                  size)
        return None
    return {"size": size, "header": {"length": header_len, "sha256": None}, "tensors": tensors}


def write_manifest(out_dir: str | Path, shards: list[ShardLayout], *, pymerge_version: str,
                   tensor_hashes: Mapping[str, JournalEntry] | None = None) -> Path:
    """Write ``pymerge_manifest.json`` (version 2) into ``out_dir``: the size and hashes of every file there, the
    tensor list (name, dtype, shape, shard) and the pymerge version. Call it after every other file is written.

    ``tensor_hashes`` are the journal entries of every output tensor (``TensorCommitter.entries()``): a shard of
    ``shards`` whose tensors all have one is recorded as its header's hash plus those tensor hashes, so only its
    header is read here. Every other file, and a shard with a tensor missing from ``tensor_hashes``, is read and
    hashed whole.
    """
    out_dir = Path(out_dir)
    layouts = {s.filename: s for s in shards}
    known = tensor_hashes or {}
    files: dict[str, dict[str, Any]] = {}
    todo: list[tuple[Path, int, int, dict[str, Any]]] = []  # bytes no journal hash covers: (path, off, len, into)
    for rel in _output_files(out_dir):
        name, path = rel.as_posix(), out_dir / rel
        size = path.stat().st_size
        entry = _shard_entry(layouts[name], size, known) if name in layouts else None
        if entry is None:
            entry = {"size": size, "sha256": None}
            todo.append((path, 0, size, entry))
        else:
            todo.append((path, 0, entry["header"]["length"], entry["header"]))
        files[name] = entry
    for (path, offset, length, into), digest in zip(todo, _hash_ranges([t[:3] for t in todo])):
        if digest is None:
            raise MergeError(f"{path}: the file shrank below {offset + length} bytes while the manifest was written")
        into["sha256"] = digest
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "pymerge_version": pymerge_version,
        "files": files,
        "tensors": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "shard": s.filename}
                    for s in shards for t in s.tensors],
    }
    path = out_dir / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return path


@dataclass(frozen=True)
class VerifyReport:
    """A verified output directory: how many files and tensors the manifest lists (all checked)."""

    out_dir: str
    files: int
    tensors: int
    bytes: int


def _is_size(x: Any) -> bool:
    return type(x) is int and x >= 0  # JSON true/false parse as bool, a subclass of int: not a size


def _is_piece(x: Any) -> bool:
    """Whether ``x`` is a version-2 hashed byte range ``{"offset", "length", "sha256"}``."""
    return (isinstance(x, dict) and _is_size(x.get("offset")) and _is_size(x.get("length"))
            and isinstance(x.get("sha256"), str))


def _is_file_entry(v: Any, version: int) -> bool:
    """Whether ``v`` is a file entry of a manifest of ``version``: a size and either one whole-file sha256 or
    (version 2) a header hash and per-tensor range hashes."""
    if not (isinstance(v, dict) and _is_size(v.get("size"))):
        return False
    if isinstance(v.get("sha256"), str):
        return True
    header, tensors = v.get("header"), v.get("tensors")
    return (version >= 2 and isinstance(header, dict) and _is_size(header.get("length"))
            and isinstance(header.get("sha256"), str) and isinstance(tensors, dict)
            and all(_is_piece(t) for t in tensors.values()))


def _load_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest (only outputs written by pymerge >= 0.1 have one)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read manifest as JSON: {e}") from e
    if not (isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT):
        raise CheckpointError(f"{path}: not a pymerge manifest (expected an object with format "
                              f"{MANIFEST_FORMAT!r})")
    version = m.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: manifest version {version!r} is not supported (this pymerge reads "
                              f"versions {', '.join(map(str, READABLE_VERSIONS))}); verify with the pymerge "
                              "version that wrote it")
    ok = (isinstance(m.get("files"), dict) and isinstance(m.get("tensors"), list)
          and all(_is_file_entry(v, version) for v in m["files"].values())
          and all(isinstance(t, dict) and {"name", "dtype", "shape", "shard"} <= set(t) for t in m["tensors"]))
    if not ok:
        whole = "size and sha256" if version == 1 else "size and sha256 (or header and tensor hashes)"
        raise CheckpointError(f"{path}: not a pymerge manifest (expected format {MANIFEST_FORMAT!r} with 'files' "
                              f"mapping names to {whole}, and a 'tensors' list)")
    return m


def _safe_member(out_dir: Path, rel: str, manifest_path: Path) -> Path:
    """``out_dir / rel`` after checking that a manifest-supplied name stays inside ``out_dir``."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{manifest_path}: file name {rel!r} must be a relative path inside the directory")
    return out_dir / p


def _pieces(rel: str, entry: dict[str, Any], manifest_path: Path) -> list[tuple[int, int, str, str | None]]:
    """The hashed byte ranges of a file entry as ``(offset, length, sha256, what)`` in file order (``what``: None
    for a whole file, else "the header" or "tensor 'name'"); CheckpointError unless they tile the whole file."""
    size = entry["size"]
    if "sha256" in entry:
        return [(0, size, entry["sha256"], None)]
    header = entry["header"]
    pieces = [(0, header["length"], header["sha256"], "the header")]
    pieces += sorted(((t["offset"], t["length"], t["sha256"], f"tensor {name!r}")
                      for name, t in entry["tensors"].items()), key=lambda p: (p[0], p[1]))
    pos = 0
    for offset, length, _, what in pieces:
        if offset != pos:  # a gap would leave bytes unchecked; an overlap means the manifest was edited
            how = "leave bytes unhashed before" if offset > pos else "overlap at"
            raise CheckpointError(f"{manifest_path}: the byte ranges listed for {rel} {how} {what} (it starts at "
                                  f"byte {offset}, the ranges before it end at {pos})")
        pos = offset + length
    if pos != size:
        raise CheckpointError(f"{manifest_path}: the byte ranges listed for {rel} end at byte {pos}, but the file "
                              f"is {size} bytes")
    return pieces


def verify_output(out_dir: str | Path) -> VerifyReport:
    """Check a finished output against its manifest; CheckpointError naming the first problem found.

    In order: every listed file exists with its size; no ``.safetensors`` file the manifest does not list; every
    byte of every listed file hashes to the manifest's sha256 (whole files, or a shard's header and each of its
    tensors, which must tile the file); every shard parses with the validating reader and holds exactly the
    listed tensors, at the byte ranges hashed; the index (when there is one) maps each tensor to its shard and
    its ``metadata.total_size`` is the tensor bytes. Reads manifest versions 1 and 2.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise CheckpointError(f"output directory {out_dir} does not exist")
    mpath = out_dir / MANIFEST_NAME
    m = _load_manifest(out_dir)
    files: dict[str, dict[str, Any]] = m["files"]
    paths = {rel: _safe_member(out_dir, rel, mpath) for rel in files}

    for rel, entry in files.items():  # cheap checks first: a missing or truncated file is the common failure
        p = paths[rel]
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        size = p.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{p}: size is {size} bytes, the manifest says {entry['size']} "
                                  "(truncated or replaced)")
    for extra in _output_files(out_dir):
        if extra.name.endswith(".safetensors") and extra.as_posix() not in files:
            raise CheckpointError(f"{out_dir / extra}: unexpected safetensors file, not in the manifest "
                                  "(a loader could pick it up as weights)")
    checks = [(rel, piece) for rel, entry in files.items() for piece in _pieces(rel, entry, mpath)]
    digests = _hash_ranges([(paths[rel], piece[0], piece[1]) for rel, piece in checks])
    for (rel, (offset, length, want, what)), digest in zip(checks, digests):
        if digest == want:
            continue
        where = "" if what is None else f" of {what} (bytes [{offset}, {offset + length}))"
        got = "cannot be computed: the file ended early" if digest is None else digest
        raise CheckpointError(f"{paths[rel]}: sha256{where} {got} does not match the manifest ({want}); the file "
                              "was modified or corrupted")

    by_shard: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for t in m["tensors"]:
        by_shard.setdefault(t["shard"], {})[t["name"]] = (t["dtype"], list(t["shape"]))
    for rel, entry in files.items():
        if entry.get("tensors") and rel not in by_shard:
            raise CheckpointError(f"{mpath}: {rel} is hashed per tensor, but the tensor list has none in it")
    total = 0
    for shard, expected in by_shard.items():
        if shard not in files:
            raise CheckpointError(f"{mpath}: tensors are listed in shard {shard!r}, which is not a listed file")
        st = SafetensorsFile(paths[shard])  # CheckpointError (naming the file) if the header is invalid
        try:
            got = {n: (i.dtype, list(i.shape)) for n, i in st.tensors.items()}
            spans = {n: (i.begin, i.end - i.begin) for n, i in st.tensors.items()}
            total += sum(i.nbytes for i in st.tensors.values())
        finally:
            st.close()
        if got != expected:
            diff = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
            raise CheckpointError(f"{paths[shard]}: tensors do not match the manifest (first difference: "
                                  f"{diff[0]!r})")
        _check_spans(paths[shard], files[shard], spans)
    _check_index(out_dir, files, by_shard, total)
    return VerifyReport(out_dir=str(out_dir), files=len(files), tensors=len(m["tensors"]),
                        bytes=sum(e["size"] for e in files.values()))


def _check_spans(path: Path, entry: dict[str, Any], spans: dict[str, tuple[int, int]]) -> None:
    """A shard hashed per tensor names each tensor at the byte range its header gives it, so a hash mismatch
    is reported for the right tensor (a manifest edited to relabel the ranges fails here)."""
    if "tensors" not in entry:
        return
    listed = {n: (t["offset"], t["length"]) for n, t in entry["tensors"].items()}
    for name in sorted(set(listed) | set(spans)):
        if listed.get(name) != spans.get(name):
            raise CheckpointError(f"{path}: the manifest hashes tensor {name!r} as (offset, length) "
                                  f"{listed.get(name)}, the shard's header puts it at {spans.get(name)}")


def _check_index(out_dir: Path, files: dict[str, Any], by_shard: dict[str, dict], total: int) -> None:
    """The index agrees with the shards: same name → shard map, ``metadata.total_size`` = tensor bytes."""
    path = out_dir / INDEX_NAME
    if INDEX_NAME not in files:
        if len(by_shard) > 1:
            raise CheckpointError(f"{path}: {len(by_shard)} shards but the manifest lists no index")
        return
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        total_size = index["metadata"]["total_size"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read weight_map and metadata.total_size: {e!r}") from e
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{path}: weight_map must be an object, got {type(weight_map).__name__}")
    want = {name: shard for shard, names in by_shard.items() for name in names}
    for name in sorted(set(want) | set(weight_map)):
        if weight_map.get(name) != want.get(name):
            raise CheckpointError(f"{path}: weight_map maps {name!r} to {weight_map.get(name)!r}, but it is in "
                                  f"shard {want.get(name)!r}")
    if total_size != total:
        raise CheckpointError(f"{path}: metadata.total_size is {total_size}, the shards hold {total} bytes of "
                              "tensor data")
