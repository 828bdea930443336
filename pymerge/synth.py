"""Synthetic Llama-shaped checkpoint families: one base model and N "fine-tuned" experts.

Used by the demo, the benchmarks and the tests, wherever real checkpoints would be too big or need a download.
Every model directory is a valid Hugging Face Llama checkpoint (config.json, generation_config.json, an optional
WordLevel tokenizer, safetensors weights, sharded with an index when asked), so transformers and mergekit load
it as they would a real one.

Weights:
- base: linear weights and embeddings ~ N(0, 0.02²); norm weights ~ 1 + N(0, 0.02²);
- expert e: base + τ_e, where τ_e (with δ = ``delta_scale``) is the sum of
  - a component shared by all experts, std δ/4 (so the experts agree in part: sign election, SLERP and
    model stock then see correlated task vectors rather than pure noise),
  - an independent dense component, std δ/4,
  - a sparse component: about 2% of the entries get an extra N(0, δ²) (so the top-k trim of TIES keeps the
    large entries and means something).
Everything is generated in fp32 and cast once to the requested dtype. Each tensor draws from its own
generator, seeded from (seed, model, tensor name), so a family is reproducible for a seed whatever the order.

Memory: at most one model (or, when sharded, one shard) of output is held at a time; an expert reads the base
tensor it needs back from the base files already written, instead of keeping the base in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, List, Optional, Tuple

import torch

from pymerge.errors import ConfigError

__all__ = ["LlamaShape", "PRESETS", "make_family", "model_dir_names"]

# Bump when the generated values change, so that stale caches are regenerated.
_GENERATOR_VERSION = 1
_STAMP_NAME = "synth_family.json"
_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"

_INIT_STD = 0.02  # Llama's initializer_range: the scale of a freshly initialised linear weight
_SPARSE_FRACTION = 0.02  # share of entries that get a large extra delta

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


@dataclass(frozen=True)
class LlamaShape:
    """The sizes that determine a Llama checkpoint's tensors (HF ``LlamaConfig`` field meanings)."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("int", int) and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"LlamaShape.{field.name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError(f"LlamaShape: hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ConfigError(f"LlamaShape: heads={self.heads} is not divisible by kv_heads={self.kv_heads}")

    @property
    def head_dim(self) -> int:
        """Size of one attention head (hidden / heads)."""
        return self.hidden // self.heads

    def tensor_specs(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """The (name, shape) of every stored tensor, in HF Llama naming and state-dict order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        specs: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            specs += [
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
                (p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,)),
            ]
        specs.append(("model.norm.weight", (h,)))
        if not self.tie_embeddings:
            specs.append(("lm_head.weight", (self.vocab, h)))
        return specs

    def param_count(self) -> int:
        """Number of stored parameters (a tied lm_head is not counted twice)."""
        return sum(math.prod(shape) for _, shape in self.tensor_specs())

    def hf_config(self, dtype: torch.dtype = torch.bfloat16) -> dict:
        """A transformers ``LlamaConfig`` dict (as config.json holds it) for this shape."""
        name = _dtype_name(dtype)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "initializer_range": _INIT_STD,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": self.tie_embeddings,
            # transformers < 4.56 reads torch_dtype, newer versions dtype: write both.
            "torch_dtype": name,
            "dtype": name,
        }


PRESETS: Dict[str, LlamaShape] = {
    # Tests: odd sizes everywhere (head_dim 8, one KV head shared by 5 query heads), ~60k parameters.
    "tiny": LlamaShape(hidden=40, intermediate=104, layers=3, vocab=131, heads=5, kv_heads=1),
    # Demo: ~99M parameters, ~200 MB per model in bf16.
    "demo": LlamaShape(hidden=768, intermediate=2048, layers=8, vocab=32000, heads=12, kv_heads=4),
    # Benchmarks: TinyLlama's layer shape with 20 layers, ~1.01B parameters, ~2 GB per model in bf16.
    "1b": LlamaShape(hidden=2048, intermediate=5632, layers=20, vocab=32000, heads=32, kv_heads=4),
}


def model_dir_names(n_experts: int) -> List[str]:
    """Directory names of a family's models: ``base`` then ``expert_0`` ... ``expert_{n-1}``."""
    return ["base"] + [f"expert_{i}" for i in range(n_experts)]


def make_family(
    out_dir: Path,
    shape: LlamaShape,
    *,
    n_experts: int,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    delta_scale: float = 0.01,
    with_tokenizer: bool = True,
    max_shard_bytes: Optional[int] = None,
    progress: bool = False,
) -> Tuple[Path, List[Path]]:
    """Write (or reuse) a base model and ``n_experts`` experts under ``out_dir``; return (base, experts).

    ``out_dir/base`` and ``out_dir/expert_{i}`` are complete HF Llama checkpoints. When ``out_dir`` already
    holds a family generated with the same parameters (its stamp file matches), it is returned untouched.
    ``max_shard_bytes`` splits each model into ``model-0000k-of-0000n.safetensors`` files plus an index;
    without it each model is a single ``model.safetensors``.
    """
    out_dir = Path(out_dir)
    _dtype_name(dtype)  # validate early
    if n_experts < 0:
        raise ConfigError(f"make_family: n_experts must be >= 0, got {n_experts}")
    if not (delta_scale >= 0 and math.isfinite(delta_scale)):
        raise ConfigError(f"make_family: delta_scale must be a finite number >= 0, got {delta_scale}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ConfigError(f"make_family: max_shard_bytes must be positive, got {max_shard_bytes}")

    names = model_dir_names(n_experts)
    paths = [out_dir / name for name in names]
    stamp = {
        "generator_version": _GENERATOR_VERSION,
        "shape": dataclasses.asdict(shape),
        "n_experts": n_experts,
        "dtype": _dtype_name(dtype),
        "seed": seed,
        "delta_scale": delta_scale,
        "with_tokenizer": with_tokenizer,
        "max_shard_bytes": max_shard_bytes,
    }
    stamp_path = out_dir / _STAMP_NAME
    if _read_json(stamp_path) == stamp and all(p.is_dir() for p in paths):
        return paths[0], paths[1:]

    # Invalidate first: a run killed half-way must not leave a stamp next to partial models.
    stamp_path.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(shape.tensor_specs(), _element_size(dtype), max_shard_bytes)

    for model_index, (name, path) in enumerate(zip(names, paths)):
        tmp = out_dir / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_metadata(tmp, shape, dtype, with_tokenizer)
        if model_index == 0:
            make_tensor = _base_tensor_fn(seed)
        else:
            make_tensor = _expert_tensor_fn(seed, model_index - 1, delta_scale, paths[0])
        _write_weights(tmp, shards, make_tensor, dtype, sharded=max_shard_bytes is not None,
                       label=name if progress else None)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)

    _write_json(stamp_path, stamp)
    return paths[0], paths[1:]


# ----------------------------------------------------------------------------------------------------------
# Values


def _stable_int(seed: int, *key: object) -> int:
    """A 63-bit integer from a stable hash of (seed, *key) (Python's hash() is salted per process)."""
    text = "/".join(str(k) for k in (seed,) + key).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def _generator(seed: int, *key: object) -> torch.Generator:
    """A CPU generator for the stream (seed, *key): independent streams per model and tensor."""
    return torch.Generator().manual_seed(_stable_int(seed, *key))


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _base_value(seed: int, name: str, shape: Tuple[int, ...]) -> torch.Tensor:
    """Base tensor in fp32: N(0, 0.02²), or 1 + N(0, 0.02²) for RMSNorm weights."""
    out = torch.empty(shape, dtype=torch.float32).normal_(0.0, _INIT_STD, generator=_generator(seed, "base", name))
    if _is_norm(name):
        out.add_(1.0)
    return out


def _expert_delta(seed: int, expert: int, name: str, base: torch.Tensor, delta_scale: float) -> torch.Tensor:
    """Task vector of one expert for one tensor (fp32, same shape as ``base``); see the module docstring."""
    n = base.numel()
    quarter = delta_scale / 4
    gen = _generator(seed, "expert", expert, name)
    delta = torch.empty(n, dtype=torch.float32).normal_(0.0, quarter, generator=gen)
    # Shared component: identical for every expert because it depends on the base and the name only. It is a
    # standardised cyclic shift of the base values, which costs no random draw (the draws dominate the run
    # time): shifted by about half the tensor, the values are ~Gaussian and independent of the base
    # elementwise, which is all that is needed of them.
    if n > 1:
        shift = n // 2 + 1 + _stable_int(seed, "shift", name) % max(n // 4, 1)
        flat = base.reshape(-1)
        # Standardise with statistics of a fixed fp64 sample (a roll does not change them): a full fp32
        # reduction would depend on the thread count, and the family must be bit-identical everywhere.
        std, mean = torch.std_mean(flat[:: max(1, n // 65536)].double())
        if float(std) > 0:
            alpha = quarter / float(std)
            delta.add_(torch.roll(flat, shifts=shift % n), alpha=alpha).sub_(alpha * float(mean))
    # Unique positions: with repeated indices the accumulation order (hence the rounding) could vary.
    # (sort + unique_consecutive: torch.unique's sorted path is ~10x slower on CPU.)
    index = torch.randint(0, n, (max(1, round(_SPARSE_FRACTION * n)),), generator=gen).sort().values
    index = index.unique_consecutive()
    values = torch.empty(index.numel(), dtype=torch.float32).normal_(0.0, delta_scale, generator=gen)
    delta.index_add_(0, index, values)
    return delta.reshape(base.shape)


TensorFn = Callable[[str, Tuple[int, ...]], torch.Tensor]


def _base_tensor_fn(seed: int) -> TensorFn:
    def make(name: str, shape: Tuple[int, ...]) -> torch.Tensor:
        return _base_value(seed, name, shape)

    return make


def _expert_tensor_fn(seed: int, expert: int, delta_scale: float, base_dir: Path) -> TensorFn:
    """Expert tensors = the stored base tensor (read back from disk, widened to fp32) + a delta."""
    from safetensors import safe_open

    weight_map = _weight_map(base_dir)
    handles: Dict[str, object] = {}
    lock = threading.Lock()  # make() runs on worker threads; a safe_open handle is not meant to be shared

    def make(name: str, shape: Tuple[int, ...]) -> torch.Tensor:
        file = weight_map[name]
        with lock:
            if file not in handles:
                handles.clear()  # tensors are visited in file order: keep one file open
                handles[file] = safe_open(str(base_dir / file), framework="pt")
            base = handles[file].get_tensor(name)  # type: ignore[attr-defined]
        base = base.to(torch.float32)
        return base.add_(_expert_delta(seed, expert, name, base, delta_scale))

    return make


# ----------------------------------------------------------------------------------------------------------
# Files


def _plan_shards(
    specs: List[Tuple[str, Tuple[int, ...]]], element_size: int, max_shard_bytes: Optional[int]
) -> List[List[Tuple[str, Tuple[int, ...]]]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    if max_shard_bytes is None:
        return [list(specs)]
    shards: List[List[Tuple[str, Tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = math.prod(shape) * element_size
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _shard_file_names(n_shards: int, sharded: bool) -> List[str]:
    if not sharded:
        return [_SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]


def _write_weights(
    model_dir: Path,
    shards: List[List[Tuple[str, Tuple[int, ...]]]],
    make_tensor: TensorFn,
    dtype: torch.dtype,
    *,
    sharded: bool,
    label: Optional[str],
) -> None:
    """Generate and write one model's tensors shard by shard (only one shard is held in memory).

    ``sharded`` writes ``model-0000k-of-0000n.safetensors`` files and an index even when one shard holds
    everything, so that a caller who asked for shards always gets the sharded layout.
    """
    from safetensors.torch import save_file

    files = _shard_file_names(len(shards), sharded)
    weight_map: Dict[str, str] = {}
    total = 0
    def make_stored(spec: Tuple[str, Tuple[int, ...]]) -> torch.Tensor:
        return make_tensor(*spec).to(dtype).contiguous()  # cast on the worker: the fp32 copy dies there

    with _progress(sum(len(s) for s in shards), label) as tick:
        for file, shard in zip(files, shards):
            tensors: Dict[str, torch.Tensor] = {}
            for (name, _), tensor in zip(shard, _ordered_map(make_stored, shard)):
                tensors[name] = tensor
                total += tensor.numel() * tensor.element_size()
                weight_map[name] = file
                tick()
            save_file(tensors, str(model_dir / file), metadata={"format": "pt"})
            del tensors
    if sharded:
        _write_json(model_dir / _INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _ordered_map(fn: Callable, items: List, workers: Optional[int] = None) -> Iterator:
    """``map(fn, items)`` on a few threads, in order, at most ``workers`` results ahead of the consumer.

    Generation is bound by torch's random draws, which run on one core per call; each tensor has its own
    generator, so running several tensors at once changes no value. The window bounds the extra memory.
    """
    workers = workers or max(1, min(4, torch.get_num_threads()))
    if workers == 1 or len(items) < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="synth") as pool:
        pending: Deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _weight_map(model_dir: Path) -> Dict[str, str]:
    """tensor name -> file name, from the index json or the single safetensors file."""
    index = _read_json(model_dir / _INDEX_FILE)
    if index is not None:
        return dict(index["weight_map"])
    from safetensors import safe_open

    with safe_open(str(model_dir / _SINGLE_FILE), framework="pt") as f:
        return {name: _SINGLE_FILE for name in f.keys()}


def _write_metadata(model_dir: Path, shape: LlamaShape, dtype: torch.dtype, with_tokenizer: bool) -> None:
    config = shape.hf_config(dtype)
    _write_json(model_dir / "config.json", config)
    _write_json(
        model_dir / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    if with_tokenizer:
        _write_tokenizer(model_dir, shape.vocab, config["max_position_embeddings"])


def _write_tokenizer(model_dir: Path, vocab: int, max_length: int) -> None:
    """A WordLevel tokenizer (whitespace split) whose vocabulary exactly fills the embedding rows."""
    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials[:vocab] + [f"w{i}" for i in range(len(specials), vocab)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, tok in enumerate(specials[:vocab])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {tok: i for i, tok in enumerate(tokens)}, "unk_token": "<unk>"},
    }
    _write_json(model_dir / "tokenizer.json", tokenizer)
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(model_dir / "special_tokens_map.json", special_map)
    _write_json(
        model_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": max_length,
            "clean_up_tokenization_spaces": False,
            **special_map,
        },
    )


# ----------------------------------------------------------------------------------------------------------
# Small utilities


def _dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ConfigError(
            f"make_family: dtype {dtype} is not supported; expected one of {sorted(_DTYPE_NAMES.values())}"
        ) from None


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    tmp.replace(path)


class _progress:
    """Context manager yielding a tick() callback: a tqdm bar on stderr when ``label`` is set, else no-op."""

    def __init__(self, total: int, label: Optional[str]) -> None:
        self._bar = None
        if label is not None:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=f"synth {label}", unit="tensor", file=sys.stderr)
            except ImportError:  # tqdm is a dependency, but progress is cosmetic
                print(f"synth: writing {label}", file=sys.stderr)

    def __enter__(self) -> Callable[[], None]:
        bar = self._bar
        return (lambda: bar.update(1)) if bar is not None else (lambda: None)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
