"""The method contract: every merge method is a few passes over row chunks of one output tensor.

A method never sees files, devices or memory budgets. For each output tensor the executor builds a
``TensorJob`` (resolved parameters, input order, where the base is), asks the method for a ``TensorMerge``,
and then drives it:

    for p in range(merge.reduce_passes):      # statistics: histograms, norms, dot products
        for chunk in chunks: merge.reduce(p, chunk)
        merge.end_pass(p)
    for chunk in chunks (in row order): out = merge.map(chunk)   # the output rows

A ``Chunk`` holds whole rows ``[row_start, row_stop)`` of every input, widened to fp32, as a
``[n_inputs, rows, row_numel]`` tensor. When the tensor fits the memory budget there is exactly one chunk and
every pass runs on data that is already resident. Map passes (and reduce passes that rebuild masks) see the
chunks in row order, which is what lets exact top-k ties be broken by lowest flat index across chunks.

A method that runs on a native backend (``job.backend``: ``cpu``) may return a merge with ``raw_inputs`` set:
its chunks then carry ``raw``, the stored bytes of every input as [rows, row_numel] views of the memory maps
(no fp32 copy), and its ``map`` returns the output rows already in ``job.out_dtype``. Such a merge must give
the same bytes as the method's torch merge.

Methods that need whole-model statistics (``ties`` with ``trim_scope: global``) also implement the
``global_*`` hooks: the executor then runs ``global_passes`` reduce passes over every tensor first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class ParamSpec:
    """A method parameter: ``per_model`` ones are set per input model, the others once per tensor."""

    name: str
    kind: type  # float | bool | int | str
    default: Any = None
    per_model: bool = False
    required: bool = False
    doc: str = ""
    # A per-model path to a statistics file of this kind ("fisher" or "gram", see pymerge/io/statistics.py):
    # the plan opens and validates it, and the method gets this tensor's statistics in TensorJob.aux[name].
    statistics: str | None = None

    def coerce(self, value: Any, where: str) -> Any:
        """Validate one resolved value (YAML may give ints for floats, or numeric strings)."""
        if value is None:
            return None
        try:
            if self.kind is bool:
                if isinstance(value, bool):
                    return value
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    return value.lower() == "true"
                if isinstance(value, (int, float)) and value in (0, 1):
                    return bool(value)
                raise ValueError
            if self.kind is float:
                if isinstance(value, bool):
                    raise ValueError
                return float(value)
            if self.kind is int:
                if isinstance(value, bool) or float(value) != int(float(value)):
                    raise ValueError
                return int(float(value))
            return self.kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: parameter '{self.name}' expects {self.kind.__name__}, got {value!r}") from None


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs from the plan: its parameters and the shape of its inputs."""

    name: str
    params: tuple[ParamSpec, ...]
    needs_base: bool  # True: base_model required and treated as the base; False: base (if any) is a plain input
    min_inputs: int = 1  # counting the base when it is an input
    max_inputs: int | None = None
    reference: str = ""
    doc: str = ""

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass
class TensorJob:
    """Everything a method needs to merge one output tensor, already resolved by the plan."""

    name: str  # output tensor name
    shape: tuple[int, ...]
    inputs: list[str]  # model labels, in input order
    base_index: int | None  # position of the base in ``inputs`` (None: no base input)
    params: dict[str, Any]  # tensor-level parameters
    model_params: list[dict[str, Any]]  # per-input parameters, aligned with ``inputs``
    model_ids: list[int]  # stable per-model ids (position in the config's model list): Philox stream ids
    seed: int = 0
    global_state: Any = None  # whatever the method's global passes produced
    # Filled by the executor before ``Method.start``: the kernel backend chosen for the merge, whether the user
    # asked for it explicitly (then a tensor it cannot run is an error, not a fallback), and the dtypes.
    backend: str = "torch"
    backend_explicit: bool = False
    in_dtypes: tuple = ()  # stored dtype of each input, aligned with ``inputs``
    out_dtype: Any = None  # torch dtype of the output tensor
    # per-model auxiliary inputs of params declared with ``statistics``: name -> one tensor (or None) per input,
    # aligned with ``inputs``; zero-copy views filled by the plan (methods never open files)
    aux: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows of the 2-D view methods work on: dim 0 for matrices, a single row for 0-d/1-d tensors
        (mergekit treats a vector as one row, e.g. for DELLA's per-row ranks)."""
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def row_numel(self) -> int:
        n = 1
        for s in (self.shape[1:] if len(self.shape) >= 2 else self.shape):
            n *= s
        return n

    @property
    def numel(self) -> int:
        return self.rows * self.row_numel

    @property
    def expert_indices(self) -> list[int]:
        return [i for i in range(len(self.inputs)) if i != self.base_index]


@dataclass
class Chunk:
    """Whole rows [row_start, row_stop) of every input: as fp32 ``data[n_inputs, rows, row_numel]``, or for a
    ``raw_inputs`` merge as ``raw`` (one stored-dtype [rows, row_numel] view per input) with ``data`` None."""

    row_start: int
    row_stop: int
    data: torch.Tensor | None
    raw: list[torch.Tensor] | None = None

    @property
    def row_numel(self) -> int:
        return self.data.shape[2] if self.data is not None else self.raw[0].shape[1]  # type: ignore[index]

    @property
    def flat_start(self) -> int:
        return self.row_start * self.row_numel

    @property
    def numel(self) -> int:
        return (self.row_stop - self.row_start) * self.row_numel


class TensorMerge:
    """One output tensor's merge: reduce passes (statistics), then the map pass (output rows)."""

    reduce_passes: int = 0
    raw_inputs: bool = False  # chunks carry the stored bytes (``Chunk.raw``), map returns ``job.out_dtype``
    # Working memory a raw merge allocates per element of a chunk beyond its output (torch temporaries); the
    # executor counts it when it sizes the chunks.
    raw_scratch_per_element: float = 0.0
    # A raw merge that sees every non-finite input by itself (its reduce passes read every element of every
    # input, or its output is non-finite wherever an input is) may set ``finds_nonfinite``: the executor then
    # skips its NaN/Inf scan and, when the NaN policy applies, sets ``nonfinite_found`` to a callable the merge
    # must call as soon as it has seen a non-finite value, before the map pass writes anything that depends on it
    # (the callable raises the executor's MergeError naming the inputs, or returns when the inputs were finite).
    finds_nonfinite: bool = False
    nonfinite_found = None

    def reduce(self, p: int, chunk: Chunk) -> None:  # pragma: no cover - methods without reduce passes
        raise NotImplementedError

    def end_pass(self, p: int) -> None:
        pass

    def map(self, chunk: Chunk) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Method:
    """A registered merge method: its spec plus a factory of per-tensor merges."""

    spec: MethodSpec
    # scratch memory of the method, in fp32 copies of one input chunk per input, beyond the inputs themselves;
    # the executor sizes chunks with it (see executor.chunk_rows)
    scratch_factor: float = 2.0
    global_passes_fn: Any = None
    extra: dict = field(default_factory=dict)

    def start(self, job: TensorJob) -> TensorMerge:  # pragma: no cover - overridden
        raise NotImplementedError

    # --- whole-model statistics (optional) ---
    def global_passes(self, params: dict[str, Any]) -> int:
        return 0

    # False when the global passes read only what the jobs carry (``job.aux`` statistics): their chunks then
    # have ``data`` None and the executor reads no weights for them.
    global_reads_weights = True  # a class attribute (not a dataclass field): subclasses override it

    def global_state_without_passes(self, params: dict[str, Any]) -> bool:
        """With ``global_passes`` 0: whether ``global_init`` still runs (state from the jobs alone, e.g. the
        tensor names), its result becoming every job's ``global_state`` without reading any weights."""
        return False

    def global_init(self, jobs: list[TensorJob]) -> Any:  # pragma: no cover - only for global methods
        raise NotImplementedError

    def global_reduce(self, state: Any, p: int, job: TensorJob, chunk: Chunk) -> None:  # pragma: no cover
        raise NotImplementedError

    def global_end_pass(self, state: Any, p: int) -> None:  # pragma: no cover
        raise NotImplementedError
