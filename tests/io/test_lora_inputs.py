"""PEFT LoRA adapters as merge inputs: the tensors we present equal PEFT's own merge_and_unload().

Adapters are made by real ``peft`` on tiny float64 models (so the comparison is not blurred by rounding), with
every LoRA factor randomised (PEFT initialises lora_B to zero, which would make ΔW = 0 and the test vacuous).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import pymerge
from pymerge.errors import CheckpointError, PymergeError
from pymerge.io.lora import LoraCheckpoint, open_lora_reference, split_lora_reference

from ..methods import reference as ref

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)  # float64 math on both sides; only summation order differs
# The executor merges in fp32 (design: inputs widened to fp32) even for fp64 checkpoints: values are O(1), so a
# few fp32 roundings stay below 1e-6 while a wrong term (a missed ΔW, a wrong scale) is off by O(0.1).
FP32_MATH = 1e-6


def _llama(attention_bias: bool = False):
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=24, intermediate_size=42, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   attention_bias=attention_bias)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(F64)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=31, n_embd=16, n_layer=2, n_head=2, n_positions=20,
                                  tie_word_embeddings=False)
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(cfg).to(F64)


def _make(tmp: Path, model, lora_config, *, seed: int, touch_base_layer: bool = False):
    """Save base and adapter under ``tmp``; return (base dir, adapter dir, PEFT's merged state dict)."""
    base_dir, adapter_dir = tmp / "base", tmp / "adapter"
    model.save_pretrained(base_dir)
    pm = peft.get_peft_model(model, lora_config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name or (touch_base_layer and "embed_tokens.base_layer" in name):
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.3)
    pm.save_pretrained(adapter_dir)
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base_dir, adapter_dir, merged


def _assert_all_tensors_match(ck: LoraCheckpoint, merged: dict[str, torch.Tensor]) -> None:
    names = ck.names()
    assert names and set(names) <= set(merged)
    for name in names:
        ours = ck.tensor(name)
        assert tuple(ck.info(name).shape) == tuple(ours.shape)
        assert ours.dtype == ck.info(name).torch_dtype
        torch.testing.assert_close(ours.to(F64), merged[name], **TOL, msg=name)


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_patterns(tmp_path_factory):
    """Odd ranks, rank_pattern/alpha_pattern, an embedding LoRA (with a retrained embedding), modules_to_save."""
    cfg = peft.LoraConfig(r=3, lora_alpha=7, target_modules=LLAMA_ALL + ["embed_tokens"],
                          rank_pattern={"down_proj": 5, "layers.1.self_attn.k_proj": 1},
                          alpha_pattern={"layers.1.self_attn.q_proj": 11, "up_proj": 2.5},
                          modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    return _make(tmp_path_factory.mktemp("llama_patterns"), _llama(), cfg, seed=3, touch_base_layer=True)


def test_patterns_embeddings_modules_to_save_match_peft(llama_patterns):
    base, adapter, merged = llama_patterns
    with LoraCheckpoint.open(adapter, base) as ck:
        _assert_all_tensors_match(ck, merged)
        # the adapter really touched what it claims (a test that cannot fail is a defect)
        with pymerge.io.Checkpoint.open(base) as b:
            for name in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"]:
                assert not torch.allclose(b.tensor(name).to(F64), merged[name])
            assert torch.equal(b.tensor("model.norm.weight"), ck.tensor("model.norm.weight"))
        assert len(ck.lora_names()) == 2 * len(LLAMA_ALL) + 1


def test_rslora_and_lora_bias_match_peft(tmp_path):
    cfg = peft.LoraConfig(r=5, lora_alpha=3, use_rslora=True, lora_bias=True, target_modules=["q_proj", "v_proj"])
    base, adapter, merged = _make(tmp_path, _llama(attention_bias=True), cfg, seed=4)
    with LoraCheckpoint.open(adapter, base) as ck:
        _assert_all_tensors_match(ck, merged)
        assert "model.layers.0.self_attn.q_proj.bias" in ck._patches


def test_fan_in_fan_out_conv1d_matches_peft(tmp_path):
    # GPT-2's Conv1D stores W as [in, out]; attn.c_proj is square, so only fan_in_fan_out decides its layout.
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    base, adapter, merged = _make(tmp_path, _gpt2(), cfg, seed=5)
    with LoraCheckpoint.open(adapter, base) as ck:
        _assert_all_tensors_match(ck, merged)


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight",
                                  "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"])
def test_rows_compute_exactly_the_rows(llama_patterns, name):
    base, adapter, _ = llama_patterns
    with LoraCheckpoint.open(adapter, base) as ck:
        whole = ck.tensor(name)
        n = ck.info(name).n_rows
        for a, b in [(0, 1), (3, 10), (n - 2, n), (5, 5), (0, n)]:
            torch.testing.assert_close(ck.rows(name, a, b), whole[a:b], rtol=1e-14, atol=1e-14)
        with pytest.raises(CheckpointError, match="out of range"):
            ck.rows(name, 0, n + 1)


def test_lora_factors_reconstruct_delta_in_presented_layout(llama_patterns, tmp_path):
    base, adapter, merged = llama_patterns
    with LoraCheckpoint.open(adapter, base) as ck, pymerge.io.Checkpoint.open(base) as b:
        assert ck.lora_factors("model.norm.weight") is None
        for name in ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"]:
            a, bb, s = ck.lora_factors(name)
            torch.testing.assert_close(b.tensor(name) + s * bb @ a, merged[name], **TOL)
        # embeddings: PEFT stores them transposed; the factors come out in the weight's own layout
        a, bb, s = ck.lora_factors("model.embed_tokens.weight")
        assert bb.shape[0] == 37 and a.shape[1] == 24
        emb_base = load_file(str(adapter / "adapter_model.safetensors"))[
            "base_model.model.model.embed_tokens.base_layer.weight"]
        torch.testing.assert_close(emb_base + s * bb @ a, merged["model.embed_tokens.weight"], **TOL)


# ----------------------------------------------------------------------------------------------- end to end


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_linear_merge_with_an_adapter_input(llama_patterns, tmp_path):
    base, adapter, merged = llama_patterns
    cfg = _write_config(tmp_path / "merge.yml", {
        "merge_method": "linear", "base_model": str(base),
        "models": [{"model": str(adapter), "parameters": {"weight": 0.7}},
                   {"model": str(base), "parameters": {"weight": 0.3}}]})
    pymerge.merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base_sd = load_file(str(base / "model.safetensors"))
    assert set(out) == set(base_sd)
    for name, t in out.items():
        want = 0.7 * merged[name] + 0.3 * base_sd[name]
        torch.testing.assert_close(t, want, rtol=FP32_MATH, atol=FP32_MATH)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"


def test_ties_merge_of_two_adapters_small_budget(tmp_path):
    """ties over two adapters of one base, streamed in chunks (a tiny memory budget) vs ties on PEFT merges."""
    a1, a2 = tmp_path / "one", tmp_path / "two"
    a1.mkdir(), a2.mkdir()
    base, ad1, m1 = _make(a1, _llama(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "up_proj"]),
                          seed=6)
    _, ad2, m2 = _make(a2, _llama(), peft.LoraConfig(r=4, lora_alpha=4, target_modules=["up_proj", "o_proj"]),
                       seed=7)
    params = {"weight": 1.0, "density": 0.4}
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(ad1), "parameters": params}, {"model": str(ad2), "parameters": params}]}
    pymerge.merge(_write_config(tmp_path / "m.yml", cfg), tmp_path / "small", quiet=True, max_memory=4096)
    pymerge.merge(_write_config(tmp_path / "m.yml", cfg), tmp_path / "big", quiet=True)
    small = load_file(str(tmp_path / "small" / "model.safetensors"))
    big = load_file(str(tmp_path / "big" / "model.safetensors"))
    base_sd = load_file(str(base / "model.safetensors"))
    for n in base_sd:
        assert torch.equal(small[n], big[n]), n
        # the float64 TIES oracle on the inputs as the fp32 executor sees them
        b32, experts = base_sd[n].float(), [m1[n].float(), m2[n].float()]
        keeps = [ref.magnitude_keep(e.double() - b32.double(), 0.4) for e in experts]
        want = ref.gta(b32, experts, [1.0, 1.0], keeps=keeps, consensus="sum", normalize=True)
        ref.assert_matches(big[n], want)
    up = "model.layers.0.mlp.up_proj.weight"  # both adapters touch it: the merge really mixes them
    assert not torch.allclose(big[up], base_sd[up])


# ------------------------------------------------------------------------------------------------ references


def test_base_plus_adapter_reference(llama_patterns, tmp_path):
    base, adapter, merged = llama_patterns

    def candidates(r):
        return [Path(r)]

    assert split_lora_reference("a/b") is None
    assert split_lora_reference("a+b") == ("a", "b")
    with pytest.raises(CheckpointError, match="exactly one"):
        split_lora_reference("a+b+c")
    ck = open_lora_reference(f"{base}+{adapter}", None, candidates)
    with ck:
        _assert_all_tensors_match(ck, merged)
    assert open_lora_reference(str(base), None, candidates) is None  # a plain model
    with pytest.raises(CheckpointError, match="needs a base"):
        open_lora_reference(str(adapter), None, candidates)
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        open_lora_reference(f"{base}+{base}", None, candidates)
    with pytest.raises(CheckpointError, match="not found"):
        open_lora_reference(f"{base}+{tmp_path / 'nope'}", None, candidates)


def test_base_plus_adapter_in_a_config(llama_patterns, tmp_path):
    """mergekit's ``model: base+adapter`` form in a config: the adapter applied to that base, no base_model."""
    base, adapter, merged = llama_patterns
    cfg = _write_config(tmp_path / "plus.yml", {
        "merge_method": "linear",
        "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 0.25}},
                   {"model": str(base), "parameters": {"weight": 0.75}}]})
    pymerge.merge(cfg, tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base_sd = load_file(str(base / "model.safetensors"))
    for name, t in out.items():
        torch.testing.assert_close(t, 0.25 * merged[name] + 0.75 * base_sd[name], rtol=FP32_MATH, atol=FP32_MATH)


def test_config_without_base_model_is_refused(llama_patterns, tmp_path):
    _, adapter, _ = llama_patterns
    cfg = _write_config(tmp_path / "m.yml", {"merge_method": "linear",
                                              "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]})
    with pytest.raises(CheckpointError, match="needs a base"):
        pymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- bad adapters


@pytest.fixture
def small_adapter(tmp_path):
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj"])
    base, adapter, _ = _make(tmp_path, _llama(), cfg, seed=8)
    return base, adapter


def _edit_config(adapter: Path, **changes):
    path = adapter / "adapter_config.json"
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def _edit_weights(adapter: Path, fn):
    path = adapter / "adapter_model.safetensors"
    sd = load_file(str(path))
    save_file(fn(sd), str(path))


@pytest.mark.parametrize("changes, match", [
    ({"use_dora": True}, "DoRA .*not supported yet"),
    ({"alora_invocation_tokens": [1, 2]}, "cannot be merged"),
    ({"peft_type": "IA3"}, "only LoRA"),
    ({"init_lora_weights": "pissa"}, "modified base"),
    ({"layer_replication": [[0, 2]]}, "layer structure"),
    ({"r": "three"}, "'r' must be an integer"),
    ({"r": 4}, r"rank 3 but .*r=4"),
    ({"rank_pattern": {"q_proj": 2}}, r"rank 3 but .*r=2"),
])
def test_bad_configs_are_refused(small_adapter, changes, match):
    base, adapter = small_adapter
    _edit_config(adapter, **changes)
    with pytest.raises(CheckpointError, match=match):
        LoraCheckpoint.open(adapter, base)


def test_missing_files(small_adapter):
    base, adapter = small_adapter
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing adapter_model.safetensors"):
        LoraCheckpoint.open(adapter, base)
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match="missing adapter_config.json"):
        LoraCheckpoint.open(adapter, base)


def test_target_without_base_tensor(small_adapter):
    base, adapter = small_adapter
    old = "base_model.model.model.layers.1.self_attn.q_proj"
    new = "base_model.model.model.layers.1.self_attn.qq_proj"
    _edit_weights(adapter, lambda sd: {k.replace(old, new): v for k, v in sd.items()})
    with pytest.raises(CheckpointError,
                       match=r"adapter_model.safetensors.*'model.layers.1.self_attn.qq_proj'.*no such"):
        LoraCheckpoint.open(adapter, base)


def test_shape_mismatch_names_file_tensor_and_shapes(small_adapter):
    base, adapter = small_adapter
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"

    def widen(sd):
        sd[key] = torch.zeros(3, 25, dtype=F64)
        return sd

    _edit_weights(adapter, widen)
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors.*v_proj.weight.*\[3, 25\].*\[12, 25\].*"
                                              r"\[12, 24\]"):
        LoraCheckpoint.open(adapter, base)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: {k: v for k, v in sd.items() if "layers.0.self_attn.q_proj.lora_B" not in k}, "lora_A but no lora_B"),
    (lambda sd: {**sd, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(24)},
     "DoRA"),
    (lambda sd: {**sd, "base_model.model.model.layers.0.self_attn.q_proj.lora_E": torch.ones(3)}, "not a LoRA tensor"),
    (lambda sd: {k: (v.reshape(*v.shape, 1, 1) if "q_proj.lora_A" in k else v) for k, v in sd.items()},
     "convolutions"),
    (lambda sd: {k: (v[:2] if "layers.0.self_attn.q_proj.lora_A" in k else v) for k, v in sd.items()},
     "rank mismatch"),
])
def test_malformed_adapter_tensors(small_adapter, edit, match):
    base, adapter = small_adapter
    _edit_weights(adapter, lambda sd: {k: v.contiguous() for k, v in edit(sd).items()})
    with pytest.raises(CheckpointError, match=match):
        LoraCheckpoint.open(adapter, base)


def test_errors_are_pymerge_errors():
    assert issubclass(CheckpointError, PymergeError)


def test_knots_merge_of_adapters_matches_the_factor_route(tmp_path):
    """merge_method: knots over two PEFT adapters (dense streamed SVD) == ops.knots on their LoRA factors."""
    from pymerge.ops.knots import knots_merge

    a1, a2 = tmp_path / "one", tmp_path / "two"
    a1.mkdir(), a2.mkdir()
    base, ad1, _ = _make(a1, _llama(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "down_proj"]),
                         seed=9)
    _, ad2, _ = _make(a2, _llama(), peft.LoraConfig(r=2, lora_alpha=2, use_rslora=True,
                                                   target_modules=["down_proj", "embed_tokens"]), seed=10)
    models = [{"model": str(ad1), "parameters": {"weight": 1.0, "density": 0.6}},
              {"model": str(ad2), "parameters": {"weight": 0.8, "density": 0.5}}]
    cfg = {"merge_method": "knots", "base_model": str(base), "models": models, "parameters": {"lambda": 0.9}}
    pymerge.merge(_write_config(tmp_path / "k.yml", cfg), tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    base_sd = load_file(str(base / "model.safetensors"))
    with LoraCheckpoint.open(ad1, base) as c1, LoraCheckpoint.open(ad2, base) as c2:
        touched = set(c1.lora_names()) | set(c2.lora_names())
        for name, t in out.items():
            if name not in touched:
                assert torch.equal(t, base_sd[name]), name
                continue
            zero = (torch.zeros(1, t.shape[1], dtype=F64), torch.zeros(t.shape[0], 1, dtype=F64), 0.0)
            factors = [c.lora_factors(name) or zero for c in (c1, c2)]
            want = base_sd[name] + knots_merge(factors, weights=[1.0, 0.8], densities=[0.6, 0.5],
                                               lambda_=0.9).double()
            torch.testing.assert_close(t, want, rtol=0, atol=1e-5 * float((want - base_sd[name]).abs().max()))
            assert float((want - base_sd[name]).abs().max()) > 0.01
