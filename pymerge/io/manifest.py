"""``pymerge_manifest.json``: what a finished output holds (each file's size and sha256, each tensor), and the
check that an output directory still matches it.

The manifest is written last, into the temporary output directory before it is renamed into place, so it
describes exactly the files the merge produced. ``verify_output`` re-reads everything: it catches a copy that
was truncated, a flipped byte, a deleted index, or a stray shard left from another model.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymerge.errors import CheckpointError
from pymerge.io.safetensors_reader import SafetensorsFile
from pymerge.io.safetensors_writer import INDEX_NAME, ShardLayout

MANIFEST_NAME = "pymerge_manifest.json"
MANIFEST_FORMAT = "pymerge-manifest"
MANIFEST_VERSION = 1
_BLOCK = 8 * 2**20


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large blocks, so files hash in parallel threads
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """sha256 of each path, several files at a time (shards are large and the hash is CPU-bound)."""
    workers = max(1, min(len(paths), os.cpu_count() or 1, 8))
    if workers == 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(sha256_file, paths))


def _output_files(out_dir: Path) -> list[Path]:
    """Every regular file under ``out_dir`` except the manifest, as sorted relative paths."""
    files = []
    for dirpath, _dirs, names in os.walk(out_dir):
        for n in names:
            rel = (Path(dirpath) / n).relative_to(out_dir)
            if rel.as_posix() != MANIFEST_NAME and (out_dir / rel).is_file():
                files.append(rel)
    return sorted(files, key=lambda p: p.as_posix())


def write_manifest(out_dir: str | Path, shards: list[ShardLayout], *, pymerge_version: str) -> Path:
    """Write ``pymerge_manifest.json`` into ``out_dir``: size + sha256 of every file there, the tensor list
    (name, dtype, shape, shard) and the pymerge version. Call it after every other file is written."""
    out_dir = Path(out_dir)
    rels = _output_files(out_dir)
    hashes = _hash_all([out_dir / r for r in rels])
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "pymerge_version": pymerge_version,
        "files": {r.as_posix(): {"size": (out_dir / r).stat().st_size, "sha256": h} for r, h in zip(rels, hashes)},
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


def _load_manifest(out_dir: Path) -> dict[str, Any]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest (only outputs written by pymerge >= 0.1 have one)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot read manifest as JSON: {e}") from e
    ok = (isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT and isinstance(m.get("files"), dict)
          and isinstance(m.get("tensors"), list)
          and all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                  for v in m["files"].values())
          and all(isinstance(t, dict) and {"name", "dtype", "shape", "shard"} <= set(t) for t in m["tensors"]))
    if not ok:
        raise CheckpointError(f"{path}: not a pymerge manifest (expected format {MANIFEST_FORMAT!r} with 'files' "
                              "mapping names to size and sha256, and a 'tensors' list)")
    if m.get("version") != MANIFEST_VERSION:
        raise CheckpointError(f"{path}: manifest version {m.get('version')!r} is not supported (expected "
                              f"{MANIFEST_VERSION}); verify with the pymerge version that wrote it")
    return m


def _safe_member(out_dir: Path, rel: str, manifest_path: Path) -> Path:
    """``out_dir / rel`` after checking that a manifest-supplied name stays inside ``out_dir``."""
    p = Path(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{manifest_path}: file name {rel!r} must be a relative path inside the directory")
    return out_dir / p


def verify_output(out_dir: str | Path) -> VerifyReport:
    """Check a finished output against its manifest; CheckpointError naming the first problem found.

    In order: every listed file exists with its size; no ``.safetensors`` file the manifest does not list; every
    file's sha256; every shard parses with the validating reader and holds exactly the listed tensors; the index
    (when there is one) maps each tensor to its shard and its ``metadata.total_size`` is the tensor bytes.
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
    rels = list(files)
    for rel, digest in zip(rels, _hash_all([paths[r] for r in rels])):
        if digest != files[rel]["sha256"]:
            raise CheckpointError(f"{paths[rel]}: sha256 {digest} does not match the manifest "
                                  f"({files[rel]['sha256']}); the file was modified or corrupted")

    by_shard: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for t in m["tensors"]:
        by_shard.setdefault(t["shard"], {})[t["name"]] = (t["dtype"], list(t["shape"]))
    total = 0
    for shard, expected in by_shard.items():
        if shard not in files:
            raise CheckpointError(f"{mpath}: tensors are listed in shard {shard!r}, which is not a listed file")
        st = SafetensorsFile(paths[shard])  # CheckpointError (naming the file) if the header is invalid
        try:
            got = {n: (i.dtype, list(i.shape)) for n, i in st.tensors.items()}
            total += sum(i.nbytes for i in st.tensors.values())
        finally:
            st.close()
        if got != expected:
            diff = sorted(set(got) ^ set(expected)) or sorted(n for n in got if got[n] != expected[n])
            raise CheckpointError(f"{paths[shard]}: tensors do not match the manifest (first difference: "
                                  f"{diff[0]!r})")
    _check_index(out_dir, files, by_shard, total)
    return VerifyReport(out_dir=str(out_dir), files=len(files), tensors=len(m["tensors"]),
                        bytes=sum(e["size"] for e in files.values()))


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
