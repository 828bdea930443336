"""A model checkpoint on disk — one file, a directory, or a sharded directory — as one name → tensor table.

Supported layouts (checked in this order for a directory, following transformers' precedence):
``model.safetensors``; ``model.safetensors.index.json`` + shards; a single ``*.safetensors`` file;
``pytorch_model.bin.index.json`` + shards and ``pytorch_model.bin`` (pickle, only with ``allow_pickle``).
Shard names from an index are untrusted input: they must stay inside the directory.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import torch

from pymerge.errors import CheckpointError
from pymerge.io.safetensors_format import MAX_HEADER_BYTES, TORCH_TO_ST, TensorInfo
from pymerge.io.safetensors_reader import SafetensorsFile

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


class _Source(Protocol):
    path: Path
    tensors: dict[str, TensorInfo]

    def tensor(self, name: str) -> torch.Tensor: ...
    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...
    def close(self) -> None: ...


class _PickledFile:
    """A pickled state dict loaded with ``torch.load(weights_only=True, mmap=True)``, served like a file.

    TensorInfo offsets are not file positions here (the zip layout is torch's business): ``begin`` is 0 and
    ``end`` is the tensor's byte size, so ``end - begin`` and ``nbytes`` still agree.
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
        except Exception as e:  # torch raises a zoo of types for corrupt / legacy / unsafe pickles
            raise CheckpointError(
                f"{path}: cannot load pickled weights with torch.load(weights_only=True, mmap=True): {e}"
            ) from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
        self._state: dict[str, torch.Tensor] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, t in state.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise CheckpointError(
                    f"{path}: entry {name!r} is not a tensor ({type(t).__name__}); expected a flat state dict"
                )
            if t.dtype not in TORCH_TO_ST:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}")
            nbytes = t.numel() * t.element_size()
            self._state[name] = t
            self.tensors[name] = TensorInfo(
                name=name, dtype=TORCH_TO_ST[t.dtype], shape=tuple(t.shape), begin=0, end=nbytes, path=path
            )

    def tensor(self, name: str) -> torch.Tensor:
        return self._state[name]

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self._state[name]
        return (t.reshape(1) if t.dim() == 0 else t)[start:stop]

    def close(self) -> None:
        self._state = {}


class Checkpoint:
    """All tensors of one checkpoint, by name, with zero-copy access where the format allows."""

    def __init__(self, path: Path, sources: list[_Source], where: dict[str, _Source]):
        # Use Checkpoint.open(); this constructor trusts that `where` was validated.
        self.path = path
        self._sources = sources
        self._where = where
        config = path / "config.json"
        self.config_path: Path | None = config if config.is_file() else None

    # ---- opening -------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
        """Open the checkpoint at ``path`` (a weights file, an index file, or a model directory)."""
        p = Path(path)
        if not p.exists():
            raise CheckpointError(f"checkpoint {p} does not exist")
        if p.is_file():
            return cls._open_file(p, allow_pickle=allow_pickle)
        if not p.is_dir():
            raise CheckpointError(f"checkpoint {p} is neither a file nor a directory")
        if (p / SAFE_WEIGHTS).is_file():
            return cls._single(p, SafetensorsFile(p / SAFE_WEIGHTS))
        if (p / SAFE_INDEX).is_file():
            return cls._from_index(p, p / SAFE_INDEX, allow_pickle=allow_pickle)
        found = sorted(x for x in p.glob("*.safetensors") if x.is_file())
        if len(found) == 1:
            return cls._single(p, SafetensorsFile(found[0]))
        if len(found) > 1:
            raise CheckpointError(
                f"checkpoint {p} has {len(found)} .safetensors files ({', '.join(x.name for x in found)}) "
                f"but no {SAFE_INDEX} saying which tensor is in which; add the index or pass a single file"
            )
        if (p / PICKLE_INDEX).is_file():
            _check_pickle_allowed(p / PICKLE_INDEX, allow_pickle)
            return cls._from_index(p, p / PICKLE_INDEX, allow_pickle=allow_pickle)
        if (p / PICKLE_WEIGHTS).is_file():
            _check_pickle_allowed(p / PICKLE_WEIGHTS, allow_pickle)
            return cls._single(p, _PickledFile(p / PICKLE_WEIGHTS))
        raise CheckpointError(
            f"checkpoint {p} has no weights: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, a *.safetensors file, "
            f"{PICKLE_INDEX} or {PICKLE_WEIGHTS}"
        )

    @classmethod
    def _open_file(cls, p: Path, *, allow_pickle: bool) -> Checkpoint:
        if p.name.endswith(".safetensors"):
            return cls._single(p.parent, SafetensorsFile(p))
        if p.name.endswith(".index.json"):
            return cls._from_index(p.parent, p, allow_pickle=allow_pickle)
        if p.suffix in PICKLE_SUFFIXES:
            _check_pickle_allowed(p, allow_pickle)
            return cls._single(p.parent, _PickledFile(p))
        raise CheckpointError(
            f"checkpoint file {p} is not a .safetensors file, an .index.json, or a pickle "
            f"({', '.join(PICKLE_SUFFIXES)})"
        )

    @classmethod
    def _single(cls, directory: Path, source: _Source) -> Checkpoint:
        return cls(directory, [source], {name: source for name in source.tensors})

    @classmethod
    def _from_index(cls, directory: Path, index_path: Path, *, allow_pickle: bool) -> Checkpoint:
        pickled = not index_path.name.endswith(".safetensors.index.json")
        if pickled:
            _check_pickle_allowed(index_path, allow_pickle)
        suffix = ".bin" if pickled else ".safetensors"
        weight_map = _read_weight_map(index_path)
        shard_names = sorted(set(weight_map.values()))
        paths = {s: _safe_shard_path(directory, s, suffix, index_path) for s in shard_names}

        sources: list[_Source] = []
        by_shard: dict[str, _Source] = {}
        try:
            for s in shard_names:
                src: _Source = _PickledFile(paths[s]) if pickled else SafetensorsFile(paths[s])
                sources.append(src)
                by_shard[s] = src
            # A name in two shards is ambiguous (which copy is the model?); one the index does not list would
            # silently vanish from the merge. Both mean the index and the shards disagree.
            seen: dict[str, str] = {}
            for s in shard_names:
                for name in by_shard[s].tensors:
                    if name in seen:
                        raise CheckpointError(
                            f"{index_path}: tensor {name!r} is present in two shards, {seen[name]} and {s}"
                        )
                    seen[name] = s
                    if name not in weight_map:
                        raise CheckpointError(
                            f"{index_path}: shard {s} holds tensor {name!r} that the index does not list"
                        )
            for name, s in weight_map.items():
                if seen.get(name) != s:
                    raise CheckpointError(
                        f"{index_path}: index maps tensor {name!r} to {s}, but that shard does not contain it"
                    )
        except BaseException:
            for src in sources:
                src.close()
            raise
        # Serve names shard by shard in file-offset order, so walking names() reads each file sequentially.
        where = {name: src for src in sources for name in src.tensors}
        return cls(directory, sources, where)

    # ---- access --------------------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, shard by shard in storage order."""
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _source(self, name: str) -> _Source:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.path} has no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and location of tensor ``name``."""
        return self._source(name).tensors[name]

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` (zero-copy for safetensors)."""
        return self._source(name).tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` along dim 0 (a 0-d tensor is one row)."""
        src = self._source(name)
        n_rows = src.tensors[name].n_rows
        if not (0 <= start <= stop <= n_rows):
            raise CheckpointError(
                f"checkpoint {self.path}: rows [{start}, {stop}) out of range for tensor {name!r} "
                f"with {n_rows} rows"
            )
        return src.rows(name, start, stop)

    def byte_range(self, name: str) -> tuple[int, int]:
        """(address, length) of tensor ``name`` in its file mapping, or (0, 0) when it is not memory-mapped."""
        src = self._source(name)
        return src.byte_range(name) if hasattr(src, "byte_range") else (0, 0)

    def files(self) -> list[Path]:
        """The weight files backing this checkpoint."""
        return [s.path for s in self._sources]

    def close(self) -> None:
        """Release file mappings (tensors already returned stay valid)."""
        for s in self._sources:
            s.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._where)} tensors in {len(self._sources)} files)"


def _check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise CheckpointError(
            f"{path} holds pickled PyTorch weights; unpickling untrusted files can run arbitrary code, so "
            "it is refused by default. Convert the checkpoint to safetensors, or allow pickle explicitly "
            "(it is then loaded with torch.load(weights_only=True))"
        )


def _read_weight_map(index_path: Path) -> dict[str, str]:
    """The validated ``weight_map`` (tensor name → shard file name) of an index file."""
    try:
        size = index_path.stat().st_size
        if size > MAX_HEADER_BYTES:  # real indexes are kilobytes; do not read gigabytes of garbage into memory
            raise CheckpointError(f"{index_path}: index is {size} bytes, over the {MAX_HEADER_BYTES}-byte limit")
        obj: Any = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{index_path}: cannot read index as JSON: {e}") from e
    except RecursionError as e:  # arrays/objects nested thousands deep
        raise CheckpointError(f"{index_path}: index JSON is nested too deeply") from e
    if not isinstance(obj, dict) or "weight_map" not in obj:
        raise CheckpointError(f"{index_path}: index must be a JSON object with a 'weight_map'")
    wm = obj["weight_map"]
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' must be an object, got {type(wm).__name__}")
    for name, shard in wm.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                f"{index_path}: weight_map[{name!r}] must be a shard file name, got {shard!r}"
            )
    return wm


def _safe_shard_path(directory: Path, shard: str, suffix: str, index_path: Path) -> Path:
    """``directory / shard`` after checking that the index-supplied name cannot escape the directory."""
    pure = PurePosixPath(shard)
    if not shard or pure.is_absolute() or Path(shard).is_absolute():
        raise CheckpointError(f"{index_path}: shard {shard!r} must be a relative file name")
    if ".." in pure.parts:
        raise CheckpointError(f"{index_path}: shard {shard!r} must not contain '..'")
    if not shard.endswith(suffix):
        raise CheckpointError(f"{index_path}: shard {shard!r} must end with {suffix}")
    full = directory / shard
    try:
        if not full.is_file():
            raise CheckpointError(f"{index_path}: shard {shard!r} does not exist in {directory}")
        resolved = full.resolve()
    except (OSError, RuntimeError) as e:  # name too long, permission denied, symlink loop (RuntimeError < 3.13)
        raise CheckpointError(f"{index_path}: shard {shard!r}: cannot access {full}: {e}") from e
    if not any(resolved.is_relative_to(root) for root in _allowed_roots(directory)):
        raise CheckpointError(
            f"{index_path}: shard {shard!r} resolves to {resolved}, outside the checkpoint directory"
        )
    return full


def _allowed_roots(directory: Path) -> list[Path]:
    """Directories a shard may resolve into: the checkpoint dir, plus the blob store of a Hub cache snapshot.

    The Hugging Face cache keeps ``<repo>/snapshots/<rev>/<file>`` as symlinks to ``<repo>/blobs/<hash>``;
    refusing those would reject every downloaded model, and that blob store is the cache's own.
    """
    roots = [directory.resolve()]
    if directory.resolve().parent.name == "snapshots":
        roots.append(directory.resolve().parent.parent / "blobs")
    return roots
