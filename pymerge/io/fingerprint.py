"""The fingerprint of a merge run: what must be equal for a partial output to be continued by another run.

A resumed run keeps the tensors an earlier run wrote, so it must be the same merge: the same config, seed,
inputs, output layout and pymerge version. Each part is hashed separately so a refusal can say which differs.
Backend, device, memory budget and thread count are not part of it: the output bytes do not depend on them.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from pymerge.io.safetensors_writer import ShardLayout

# Safety cap on a header read for the fingerprint (the reader has already validated the real limit).
_MAX_HEADER = 100 * 2**20


def _input_file_digest(h: hashlib._Hash, path: Path) -> None:
    """Feed ``path``'s identity into ``h``: resolved path, size, mtime, and a safetensors file's header bytes."""
    st = os.stat(path)
    # The mtime catches an input rewritten in place with an unchanged header (new values, same shapes); its
    # cost is that a copied input needs --restart, which is the safe side to err on.
    h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    if not path.name.endswith(".safetensors"):
        return  # pickled inputs have no header; size and mtime stand for them
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) == 8:
            (n,) = struct.unpack("<Q", raw)
            h.update(raw + f.read(min(n, _MAX_HEADER)))


def run_fingerprint(*, config_yaml: str, seed: int, input_files: list[Path], shards: list[ShardLayout],
                    pymerge_version: str) -> dict[str, str]:
    """sha256 hex digests of each part of a run's identity: ``config``, ``seed``, ``inputs``, ``layout``,
    ``version``. Two runs may share a partial output only if every part is equal."""
    inputs = hashlib.sha256()
    for p in input_files:
        _input_file_digest(inputs, Path(p))
    layout = hashlib.sha256()
    for s in shards:
        layout.update(f"{s.filename}\0{s.file_size}\0".encode() + s.header + b"\0")
    return {
        "config": hashlib.sha256(config_yaml.encode()).hexdigest(),
        "seed": hashlib.sha256(str(int(seed)).encode()).hexdigest(),
        "inputs": inputs.hexdigest(),
        "layout": layout.hexdigest(),
        "version": hashlib.sha256(pymerge_version.encode()).hexdigest(),
    }
