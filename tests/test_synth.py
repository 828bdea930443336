"""pymerge.synth: synthetic Llama families are valid HF checkpoints, deterministic, cached and shardable."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers.mergekit_runner import load_state
from pymerge.errors import ConfigError
from pymerge.synth import PRESETS, LlamaShape, make_family

TINY = PRESETS["tiny"]


def _dtype_kwarg(transformers, dtype: torch.dtype) -> dict:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def test_tiny_family_layout(tiny_family) -> None:
    specs = TINY.tensor_specs()
    names = [n for n, _ in specs]
    assert len(set(names)) == len(names)
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == ["model.norm.weight", "lm_head.weight"]
    assert TINY.param_count() == sum(math.prod(s) for _, s in specs)
    for model_dir in [tiny_family.base, *tiny_family.experts]:
        state = load_state(model_dir)
        assert list(state) == sorted(names)  # safetensors stores names sorted
        for name, shape in specs:
            assert tuple(state[name].shape) == shape and state[name].dtype == torch.float32, name
        config = json.loads((model_dir / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
        assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (40, 3, 131)
        assert config["torch_dtype"] == "float32"
        assert (model_dir / "generation_config.json").is_file()
        assert (model_dir / "tokenizer.json").is_file()


def test_value_statistics(tiny_family) -> None:
    base = load_state(tiny_family.base)
    experts = [load_state(p) for p in tiny_family.experts]
    q = base["model.layers.1.self_attn.q_proj.weight"]
    assert abs(float(q.std()) - 0.02) < 0.002 and abs(float(q.mean())) < 0.002
    norm = base["model.norm.weight"]
    assert abs(float(norm.mean()) - 1) < 0.02 and 0.005 < float(norm.std()) < 0.04

    name = "model.layers.2.mlp.up_proj.weight"
    taus = [(e[name] - base[name]).flatten().double() for e in experts]
    for tau in taus:
        # dense part std 0.01/4·√2, plus ~2% entries with std 0.01: kurtosis ~5.8 (a Gaussian has 3)
        assert 0.003 < float(tau.std()) < 0.005
        kurtosis = float(((tau - tau.mean()) ** 4).mean() / tau.var() ** 2)
        assert kurtosis > 4.3, kurtosis
    for i in range(3):  # the shared component makes the experts agree in part
        for j in range(i + 1, 3):
            cos = float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm()))
            assert 0.15 < cos < 0.6, (i, j, cos)
    assert not torch.equal(taus[0], taus[1])


def test_deterministic_for_a_seed(tiny_family, tmp_path: Path) -> None:
    # tiny_family was generated with the default thread count (tensors generated in parallel); this copy is
    # generated serially: values must not depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, experts = make_family(tmp_path / "again", TINY, n_experts=3, dtype=torch.float32, seed=0)
    finally:
        torch.set_num_threads(threads)
    for ours, ref in zip([base, *experts], [tiny_family.base, *tiny_family.experts]):
        a, b = load_state(ours), load_state(ref)
        assert all(torch.equal(a[n], b[n]) for n in b)
    other, _ = make_family(tmp_path / "other", TINY, n_experts=1, dtype=torch.float32, seed=1)
    a, b = load_state(other), load_state(tiny_family.base)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_cache_reuses_a_complete_family_and_regenerates_on_change(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    base, experts = make_family(out, TINY, n_experts=2, dtype=torch.bfloat16, seed=3)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    base2, experts2 = make_family(out, TINY, n_experts=2, dtype=torch.bfloat16, seed=3)
    assert (base2, experts2) == (base, experts)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == stamp  # nothing rewritten

    before = load_state(experts[0])
    make_family(out, TINY, n_experts=2, dtype=torch.bfloat16, seed=3, delta_scale=0.02)
    after = load_state(experts[0])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])

    (out / "expert_1").rename(out / "gone")  # an incomplete family is regenerated, not returned
    make_family(out, TINY, n_experts=2, dtype=torch.bfloat16, seed=3, delta_scale=0.02)
    assert torch.equal(load_state(out / "expert_1")["lm_head.weight"], load_state(out / "gone")["lm_head.weight"])


def test_bfloat16_family(tmp_path: Path) -> None:
    base, experts = make_family(tmp_path, TINY, n_experts=1, dtype=torch.bfloat16, seed=0)
    state = load_state(experts[0])
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert json.loads((base / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # The expert is the stored bf16 base plus a delta, rounded once: its task vector is not all zero.
    tau = state["model.layers.0.self_attn.o_proj.weight"].float() - load_state(base)[
        "model.layers.0.self_attn.o_proj.weight"
    ].float()
    assert float((tau != 0).float().mean()) > 0.9


def test_sharded_family_writes_a_valid_index(tiny_family, tmp_path: Path) -> None:
    from safetensors import safe_open

    base, experts = make_family(
        tmp_path, TINY, n_experts=3, dtype=torch.float32, seed=0, max_shard_bytes=30_000, with_tokenizer=False
    )
    for model_dir, ref_dir in zip([base, *experts], [tiny_family.base, *tiny_family.experts]):
        assert not (model_dir / "model.safetensors").exists()
        assert not (model_dir / "tokenizer.json").exists()
        index = json.loads((model_dir / "model.safetensors.index.json").read_text())
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
        assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
        total = 0
        for file in files:
            with safe_open(str(model_dir / file), framework="pt") as f:
                assert f.metadata() == {"format": "pt"}
                names = set(f.keys())
                assert names == {n for n, v in index["weight_map"].items() if v == file}
                sizes = [f.get_tensor(n).numel() * 4 for n in names]
                assert sum(sizes) <= 30_000 or len(names) == 1
                total += sum(sizes)
        assert index["metadata"]["total_size"] == total == TINY.param_count() * 4
        # Sharding changes the files, not the values.
        a, b = load_state(model_dir), load_state(ref_dir)
        assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in b)


def test_loads_with_transformers(tiny_family, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    for model_dir in (tiny_family.base, tiny_family.experts[2]):
        model = transformers.LlamaForCausalLM.from_pretrained(model_dir, **_dtype_kwarg(transformers, torch.float32))
        state = load_state(model_dir)
        loaded = model.state_dict()
        assert set(loaded) == set(state) and all(torch.equal(loaded[n], state[n]) for n in state)
        assert model.config.head_dim == 8 and model.config.num_key_value_heads == 1
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 7, 130, 2]])).logits
        assert logits.shape == (1, 4, 131) and torch.isfinite(logits).all()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_family.base)
    assert len(tokenizer) == 131
    assert tokenizer("w5 w130 nope")["input_ids"] == [5, 130, 0]

    sharded, _ = make_family(tmp_path, TINY, n_experts=0, dtype=torch.float32, max_shard_bytes=50_000)
    model = transformers.LlamaForCausalLM.from_pretrained(sharded, **_dtype_kwarg(transformers, torch.float32))
    ref = load_state(tiny_family.base)
    assert all(torch.equal(t, ref[n]) for n, t in model.state_dict().items())


def test_tied_embeddings(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    shape = LlamaShape(hidden=24, intermediate=56, layers=2, vocab=37, heads=3, kv_heads=3, tie_embeddings=True)
    assert all(n != "lm_head.weight" for n, _ in shape.tensor_specs())
    base, _ = make_family(tmp_path, shape, n_experts=1, dtype=torch.float32)
    assert "lm_head.weight" not in load_state(base)
    model = transformers.LlamaForCausalLM.from_pretrained(base, **_dtype_kwarg(transformers, torch.float32))
    assert model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, load_state(base)["model.embed_tokens.weight"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_are_transformers_llama_shapes(preset: str) -> None:
    """Names and shapes match what transformers builds for the config (on the meta device: no memory)."""
    transformers = pytest.importorskip("transformers")
    shape = PRESETS[preset]
    config = transformers.LlamaConfig.from_dict(shape.hf_config(torch.bfloat16))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    assert [(n, tuple(t.shape)) for n, t in model.state_dict().items()] == shape.tensor_specs()
    sizes = {"tiny": (5e4, 7e4), "demo": (90e6, 110e6), "1b": (0.95e9, 1.1e9)}[preset]
    assert sizes[0] <= shape.param_count() <= sizes[1]


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="heads"):
        LlamaShape(hidden=40, intermediate=8, layers=1, vocab=10, heads=3, kv_heads=1)
    with pytest.raises(ConfigError, match="kv_heads"):
        LlamaShape(hidden=40, intermediate=8, layers=1, vocab=10, heads=4, kv_heads=3)
    with pytest.raises(ConfigError, match="layers"):
        LlamaShape(hidden=40, intermediate=8, layers=0, vocab=10, heads=4, kv_heads=1)
    with pytest.raises(ConfigError, match="dtype"):
        make_family(tmp_path, TINY, n_experts=1, dtype=torch.int8)
    with pytest.raises(ConfigError, match="max_shard_bytes"):
        make_family(tmp_path, TINY, n_experts=1, max_shard_bytes=0)
    assert not (tmp_path / "base").exists()


def test_progress_goes_to_stderr(tmp_path: Path, capsys) -> None:
    make_family(tmp_path, TINY, n_experts=1, progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "expert_0" in captured.err
