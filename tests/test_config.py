"""Tests for pymerge.config: mergekit YAML parsing, settings evaluation, precedence, errors."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pymerge.config import (
    DTYPE_NAMES,
    NON_LAYER_T,
    ConditionalParameter,
    MergeConfig,
    candidate_paths,
    evaluate_setting,
    layer_t,
    load_config,
    parse_dtype,
    parse_setting,
    resolve_parameter,
)
from pymerge.errors import ConfigError

# ----------------------------------------------------------------- example configs
# Typical configs as they appear in mergekit's README / examples.

TIES = """
models:
  - model: ./orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: ./Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: ./WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ./Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""

SLERP = """
slices:
  - sources:
      - model: ./orca_mini_v3_13b
        layer_range: [0, 40]
      - model: ./Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: ./orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: bfloat16
"""

PASSTHROUGH = """
slices:
  - sources:
    - model: ./mistral-7b
      layer_range: [0, 24]
  - sources:
    - model: ./mistral-7b
      layer_range: [8, 32]
    parameters:
      scale:
        - filter: o_proj
          value: 0.5
        - value: 1.0
merge_method: passthrough
dtype: bf16
"""

DARE_TIES = """
models:
  - model: ./Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: ./samantha-1.1-westlake-7b
    parameters:
      density: 0.53
      weight: 0.4
  - model: ./WestLake-7B-v2
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: ./Mistral-7B-v0.1
parameters:
  int8_mask: true
  normalize: false
  lambda: 1e-1
  density: 0.9
dtype: fp32
out_dtype: bfloat16
tokenizer_source: base
chat_template: chatml
"""

MODEL_STOCK = """
models:
  - model: ./Meta-Llama-3-8B-Instruct
  - model: ./Hermes-2-Pro-Llama-3-8B
  - model: /abs/Llama-3-8B-Orca
merge_method: model_stock
base_model: ./Meta-Llama-3-8B
parameters:
  filter_wise: false
dtype: bfloat16
"""

EXAMPLES = {"ties": TIES, "slerp": SLERP, "passthrough": PASSTHROUGH, "dare_ties": DARE_TIES,
            "model_stock": MODEL_STOCK}


def test_ties_example():
    c = load_config(TIES)
    assert c.merge_method == "ties" and c.dtype == "float16" and c.slices is None
    assert c.referenced_models() == ["./Llama-2-13B-fp16", "./orca_mini_v3_13b", "./Platypus2-13B",
                                     "./WizardMath-13B-V1.0"]
    r = lambda name, model, t, tensor="model.layers.0.self_attn.q_proj.weight": resolve_parameter(
        c, name, tensor_name=tensor, t=t, model=model)
    for t in np.linspace(0, 1, 13):
        assert r("density", "./orca_mini_v3_13b", t) == pytest.approx(np.interp(t, [0, .5, 1], [1, .7, .1]))
        assert r("weight", "./Platypus2-13B", t) == pytest.approx(np.interp(t, [0, 1/3, 2/3, 1], [0, .3, .7, 1]))
        assert r("weight", "./orca_mini_v3_13b", t) == 1.0
        assert r("weight", "./WizardMath-13B-V1.0", t, "model.layers.3.mlp.up_proj.weight") == 0.5
        assert r("weight", "./WizardMath-13B-V1.0", t) == 0
        assert r("normalize", None, t) is True
        assert r("density", None, t) is None  # only per-model; nothing global
    # the base model is not listed: it has no parameters of its own
    assert r("weight", "./Llama-2-13B-fp16", 0.3) is None


def test_slerp_example_filters_and_gradients():
    c = load_config(SLERP)
    assert c.slices is not None and c.slices[0].num_layers == 40
    attn = [0, 0.5, 0.3, 0.7, 1]
    mlp = [1, 0.5, 0.7, 0.3, 0]
    xs = np.linspace(0, 1, len(attn))
    for layer in range(40):
        t = layer_t(layer, 40)
        get = lambda tensor: resolve_parameter(c, "t", tensor_name=tensor, t=t, slice_index=0)
        assert get(f"model.layers.{layer}.self_attn.k_proj.weight") == pytest.approx(np.interp(t, xs, attn))
        assert get(f"model.layers.{layer}.mlp.down_proj.weight") == pytest.approx(np.interp(t, xs, mlp))
        assert get(f"model.layers.{layer}.input_layernorm.weight") == 0.5
    # non-layer tensors: t = 0, and the catch-all entry applies
    assert resolve_parameter(c, "t", tensor_name="model.embed_tokens.weight", t=NON_LAYER_T,
                             slice_index=0) == 0.5


def test_passthrough_example_slices():
    c = load_config(PASSTHROUGH)
    assert [s.sources[0].layer_range for s in c.slices] == [(0, 24), (8, 32)]
    assert c.referenced_models() == ["./mistral-7b"]
    assert c.dtype == "bfloat16"  # alias stored canonical
    name = "model.layers.9.self_attn.o_proj.weight"
    assert resolve_parameter(c, "scale", tensor_name=name, t=0.5, slice_index=1) == 0.5
    assert resolve_parameter(c, "scale", tensor_name="model.layers.9.mlp.up_proj.weight", t=0.5,
                             slice_index=1) == 1.0
    assert resolve_parameter(c, "scale", tensor_name=name, t=0.5, slice_index=0) is None


def test_dare_ties_example_global_parameters():
    c = load_config(DARE_TIES)
    assert (c.dtype, c.out_dtype, c.tokenizer_source, c.chat_template) == ("float32", "bfloat16", "base", "chatml")
    # YAML 1.1 would give the string "1e-1"; we read YAML 1.2 floats
    assert c.parameters["lambda"] == 0.1 and isinstance(c.parameters["lambda"], float)
    r = lambda name, model: resolve_parameter(c, name, tensor_name="x", t=0.2, model=model)
    assert r("density", "./samantha-1.1-westlake-7b") == 0.53
    assert r("density", "./Mistral-7B-v0.1") == 0.9  # falls back to global
    assert r("density", None) == 0.9
    assert r("int8_mask", None) is True and r("normalize", None) is False
    assert r("weight", "./Mistral-7B-v0.1") is None
    assert c.referenced_models()[0] == "./Mistral-7B-v0.1" and len(c.referenced_models()) == 3


def test_model_stock_example():
    c = load_config(MODEL_STOCK)
    assert c.parameters == {"filter_wise": False} and all(m.parameters is None for m in c.models)
    assert resolve_parameter(c, "filter_wise", tensor_name="x", t=0.0, model="./Meta-Llama-3-8B") is False
    assert c.referenced_models() == ["./Meta-Llama-3-8B", "./Meta-Llama-3-8B-Instruct",
                                     "./Hermes-2-Pro-Llama-3-8B", "/abs/Llama-3-8B-Orca"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_to_yaml_round_trip(name):
    c = load_config(EXAMPLES[name])
    text = c.to_yaml()
    assert load_config(text) == c
    assert load_config(yaml.safe_load(text)) == c  # plain YAML 1.1 reading agrees too


def test_to_yaml_quotes_number_like_strings():
    c = load_config({"merge_method": "x", "models": [{"model": "a", "parameters": {"p": "1e-3", "q": 1e-3}}]})
    back = load_config(c.to_yaml())
    assert back.models[0].parameters == {"p": "1e-3", "q": 1e-3}


# ------------------------------------------------------------------- loading sources


def test_load_from_path_str_dict(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text(TIES)
    a, b, c = load_config(f), load_config(str(f)), load_config(yaml.safe_load(TIES))
    assert a.model_dump() == b.model_dump() == c.model_dump() == load_config(TIES).model_dump()
    assert a.source_path == f and c.source_path is None
    with pytest.raises(ConfigError, match="missing.yaml.*not found"):
        load_config(str(tmp_path / "missing.yaml"))
    f.write_text("merge_method: [unclosed\n")
    with pytest.raises(ConfigError, match=r"merge.yaml: invalid YAML at line"):
        load_config(f)


def test_yaml_floats_and_quoting():
    c = load_config('merge_method: x\nmodels: [{model: a}]\nparameters: {a: 1e-3, b: "1e-3", c: 1.0e3, '
                    'd: -2E+5, e: 5, f: 1.5e-2, g: abc}')
    p = c.parameters
    assert p == {"a": 1e-3, "b": "1e-3", "c": 1e3, "d": -2e5, "e": 5, "f": 0.015, "g": "abc"}
    assert [type(p[k]) for k in "abcdeg"] == [float, str, float, float, int, str]


# ------------------------------------------------------------------ evaluate_setting


def test_gradient_matches_numpy_interp():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 7, 11):
        values = [float(v) for v in rng.normal(size=n)]
        xs = np.linspace(0, 1, n)
        for t in np.concatenate([rng.random(41), xs, [0.0, 1.0]]):
            got = evaluate_setting(values, "any", float(t))
            assert got == pytest.approx(float(np.interp(t, xs, values)), rel=1e-12, abs=1e-12)


def test_integer_gradient_and_scalars():
    assert evaluate_setting([0, 10], "x", 0.25) == pytest.approx(2.5)
    assert evaluate_setting(3, "x", 0.7) == 3
    assert evaluate_setting("abc", "x", 0.7) == "abc"
    assert evaluate_setting(True, "x", 0.7) is True


def test_non_numeric_gradient_selects():
    labels = ["a", "b", "c", "d"]
    for t in np.linspace(0, 1, 37):
        assert evaluate_setting(labels, "x", float(t)) == labels[int(t * 3)]
    # bools are not numbers: selected, not interpolated
    assert evaluate_setting([False, True], "x", 0.9) is False
    assert evaluate_setting([False, True], "x", 1.0) is True
    assert evaluate_setting([0.0, "x", 1.0], "n", 0.6) == "x"


def test_filters_first_match_star_and_no_match():
    s = parse_setting([{"filter": "mlp", "value": 1}, {"filter": "mlp.up", "value": 2},
                       {"filter": "*", "value": [0, 1]}, {"value": 9}])
    assert evaluate_setting(s, "model.layers.0.mlp.up_proj.weight", 0.5) == 1  # first match wins
    assert evaluate_setting(s, "model.layers.0.self_attn.q_proj", 0.25) == pytest.approx(0.25)  # '*'
    only = parse_setting([{"filter": "mlp", "value": 1}, {"filter": "attn", "value": 2}])
    assert evaluate_setting(only, "model.norm.weight", 0.5) is None
    assert evaluate_setting(only, "", 0.5) is None
    single = parse_setting({"filter": "attn", "value": [1, 3]})
    assert isinstance(single, ConditionalParameter)
    assert evaluate_setting(single, "x.attn.y", 0.5) == pytest.approx(2.0)
    assert evaluate_setting(single, "x.mlp.y", 0.5) is None
    # raw mappings (not yet parsed) are accepted by direct callers too
    assert evaluate_setting({"value": 4}, "x", 0.0) == 4
    assert evaluate_setting([], "x", 0.0) is None


def test_evaluate_rejects_bad_t():
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            evaluate_setting(1.0, "x", t)


def test_layer_t_is_mergekit_definition():
    for n in (2, 3, 7, 32, 40):
        ts = [layer_t(i, n) for i in range(n)]
        assert ts == [i / (n - 1) for i in range(n)]
        assert ts[0] == 0.0 and ts[-1] == 1.0
        np.testing.assert_allclose(ts, np.linspace(0, 1, n), rtol=0, atol=1e-15)
    assert layer_t(0, 1) == 1.0
    assert NON_LAYER_T == 0.0
    for bad in ((3, 3), (-1, 3), (0, 0)):
        with pytest.raises(ValueError):
            layer_t(*bad)


# ------------------------------------------------------------------------ precedence


def test_precedence_models_mode():
    c = load_config({
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"w": 1, "d": [{"filter": "mlp", "value": 0.1}]}},
                   {"model": "b"}],
        "parameters": {"w": 3, "d": 0.9},
    })
    r = lambda name, model, tensor="l.attn": resolve_parameter(c, name, tensor_name=tensor, t=0.5, model=model)
    assert r("w", "a") == 1 and r("w", "b") == 3 and r("w", None) == 3 and r("w", "base") == 3
    assert r("d", "a", "l.mlp") == 0.1
    assert r("d", "a", "l.attn") == 0.9  # filter miss falls through to the next scope
    assert r("x", "a") is None
    assert resolve_parameter(c, "w", tensor_name="x", t=0, model="a", slice_index=0) == 1
    with pytest.raises(ValueError):
        resolve_parameter(c, "w", tensor_name="x", t=0, model="a", slice_index=1)


def test_precedence_slices_mode():
    c = load_config({
        "merge_method": "slerp",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 4], "parameters": {"w": 1}},
                         {"model": "b", "layer_range": [2, 6]}],
             "parameters": {"w": 2, "v": 5}},
            {"sources": [{"model": "a", "layer_range": [4, 8]}, {"model": "b", "layer_range": [6, 10]}]},
        ],
        "parameters": {"w": 3, "v": 6, "u": 7},
    })
    r = lambda name, model, idx: resolve_parameter(c, name, tensor_name="x", t=0.0, model=model, slice_index=idx)
    assert (r("w", "a", 0), r("w", "b", 0), r("w", None, 0)) == (1, 2, 2)  # model > slice
    assert (r("w", "a", 1), r("v", "a", 0), r("v", "a", 1)) == (3, 5, 6)  # slice > global
    assert r("u", "b", 0) == 7 and r("zz", "a", 0) is None
    for bad in (None, 2, -1):
        with pytest.raises(ValueError):
            r("w", "a", bad)


# --------------------------------------------------------------------- resolve_paths


def test_resolve_paths(tmp_path):
    c = load_config({"merge_method": "ties", "base_model": "./base",
                     "models": [{"model": "a/b"}, {"model": "/abs/m"}, {"model": "base"}],
                     "tokenizer_source": "a/b"})
    r = c.resolve_paths(tmp_path)
    assert r.base_model == str(tmp_path / "base")
    assert [m.model for m in r.models] == [str(tmp_path / "a/b"), "/abs/m", str(tmp_path / "base")]
    assert r.tokenizer_source == str(tmp_path / "a/b")
    assert c.base_model == "./base"  # original untouched
    # "./base" and "base" are different strings but one directory once resolved
    assert r.referenced_models() == [str(tmp_path / "base"), str(tmp_path / "a/b"), "/abs/m"]
    s = load_config(SLERP).resolve_paths(tmp_path)
    assert s.base_model == s.slices[0].sources[0].model == str(tmp_path / "orca_mini_v3_13b")
    assert candidate_paths("m", tmp_path) == [Path("m"), tmp_path / "m"]
    assert candidate_paths("/abs/m", tmp_path) == [Path("/abs/m")]
    assert candidate_paths("m", None) == [Path("m")]


# ---------------------------------------------------------------------------- dtypes


def test_dtypes():
    for name, dt in DTYPE_NAMES.items():
        assert parse_dtype(name, "dtype") == dt
        assert parse_dtype(name.upper(), "dtype") == dt
        assert parse_dtype("torch." + name, "dtype") == dt
    assert parse_dtype("bf16", "dtype") == torch.bfloat16 and parse_dtype("half", "d") == torch.float16
    for bad in ("float64", "int8", "bfloat", ""):
        with pytest.raises(ConfigError, match="out_dtype"):
            parse_dtype(bad, "out_dtype")


# ---------------------------------------------------------------------------- errors

BASE = {"merge_method": "ties", "models": [{"model": "a"}, {"model": "b"}]}
SLICE = {"merge_method": "slerp",
         "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}]}]}


def _with(base, **changes):
    out = yaml.safe_load(yaml.safe_dump(base))
    for path, value in changes.items():
        keys = path.split("__")
        d = out
        for k in keys[:-1]:
            d = d[int(k)] if k.isdigit() else d[k]
        if value is _DELETE:
            del d[keys[-1]]
        else:
            d[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return out


_DELETE = object()

ERROR_CASES = [
    # (config, fragments that must all appear in the message)
    (_with(BASE, modles=[]), ["unknown key 'modles' at top level", "did you mean 'models'"]),
    (_with(BASE, models__1__paramters={}), ["unknown key 'paramters' in models[1]"]),
    (_with(BASE, models__0__parameters={"weight": [{"fliter": "mlp", "value": 1}]}),
     ["unknown key 'fliter' in models[0].parameters.weight[0]"]),
    (_with(BASE, models__0__parameters={"weight": [{"filter": "mlp"}]}),
     ["missing key 'value' in models[0].parameters.weight[0]"]),
    (_with(BASE, models__1__parameters={"weight": None}),
     ["models[1].parameters.weight", "expected a number, a list of numbers or {filter, value} entries"]),
    (_with(BASE, models__1__parameters={"weight": {"a": 1}}), ["unknown key 'a' in models[1].parameters.weight"]),
    (_with(BASE, parameters={"weight": [1, [2, 3]]}), ["parameters.weight[1]", "nested"]),
    (_with(BASE, parameters={"weight": [1, {"value": 2}]}), ["parameters.weight[1]", "not a mix"]),
    (_with(BASE, parameters={"weight": []}), ["parameters.weight", "empty list"]),
    (_with(BASE, parameters={"weight": float("nan")}), ["parameters.weight", "finite"]),
    (_with(BASE, parameters={"t": [{"value": {"value": 1}}]}), ["parameters.t[0].value", "do not nest"]),
    (_with(BASE, parameters={"t": [{"value": 1, "filter": 3}]}), ["parameters.t[0].filter"]),
    (_with(BASE, parameters={1: 0.5}), ["parameters", "key 1"]),
    (_with(BASE, merge_method=_DELETE), ["missing key 'merge_method' at top level"]),
    (_with(BASE, merge_method=" "), ["merge_method"]),
    (_with(BASE, merge_method=3), ["merge_method", "expected a string"]),
    (_with(BASE, models=_DELETE), ["'models'", "'slices'"]),
    ({**BASE, **SLICE}, ["'models'", "'slices'"]),
    (_with(BASE, models=[]), ["models", "empty"]),
    (_with(BASE, models={"model": "a"}), ["models", "expected a list"]),
    (_with(BASE, models__1__model="a"), ["models[1].model", "already models[0]"]),
    (_with(BASE, models__1__model=""), ["models[1].model", "empty"]),
    (_with(BASE, models__1__model={"model": "a", "lora": "l"}), ["models[1].model", "mapping form"]),
    (_with(BASE, models__1__model="a+"), ["models[1].model", "'model+adapter'", "both parts"]),
    (_with(BASE, base_model="+y"), ["base_model", "both parts"]),
    (_with(BASE, models__0__model=7), ["models[0].model", "string"]),
    (_with(BASE, modules={"decoder": {}}), ["modules", "not supported"]),
    (_with(BASE, tokenizer={"source": "base"}), ["tokenizer", "not supported"]),
    (_with(BASE, tokenizer_source="union"), ["tokenizer_source", "union", "not supported yet"]),
    (_with(BASE, tokenizer_source="base"), ["tokenizer_source", "base_model"]),
    (_with(BASE, tokenizer_source="c"), ["tokenizer_source", "'c'"]),
    (_with(BASE, dtype="float64"), ["dtype", "float64"]),
    (_with(BASE, out_dtype="fp8"), ["out_dtype", "fp8"]),
    (_with(BASE, dtype=16), ["dtype", "string"]),
    (_with(SLICE, slices=[]), ["slices", "empty"]),
    (_with(SLICE, slices__0__sources=[]), ["slices[0].sources", "at least one source"]),
    (_with(SLICE, slices__0__sources__1__layer_range=[3, 2]), ["slices[0].sources[1].layer_range", "[3, 2]"]),
    (_with(SLICE, slices__0__sources__1__layer_range=[2, 2]), ["slices[0].sources[1].layer_range", "no layers"]),
    (_with(SLICE, slices__0__sources__0__layer_range=[-1, 3]), ["slices[0].sources[0].layer_range", ">= 0"]),
    (_with(SLICE, slices__0__sources__0__layer_range=[0, 1, 2]), ["slices[0].sources[0].layer_range", "two integers"]),
    (_with(SLICE, slices__0__sources__0__layer_range=[0, "4"]), ["slices[0].sources[0].layer_range"]),
    (_with(SLICE, slices__0__sources__0__layer_range=_DELETE), ["missing key 'layer_range' in slices[0].sources[0]"]),
    (_with(SLICE, slices__0__sources__1__layer_range=[0, 5]),
     ["slices[0].sources[1].layer_range", "5 layers", "same number of layers"]),
    (_with(SLICE, slices__0__sources__1__model="a"), ["slices[0].sources[1].model", "already sources[0]"]),
    (_with(SLICE, slices__0__base_model="c"), ["slices[0].base_model", "'c'", "sources"]),
    (_with(SLICE, slices__0__residual_weight=0.5), ["slices[0].residual_weight", "not supported"]),
    (_with(SLICE, slices__0__layer_range=[0, 4]), ["unknown key 'layer_range' in slices[0]"]),
    (_with(BASE, models__0__layer_range=[0, 4]), ["unknown key 'layer_range' in models[0]"]),
]


@pytest.mark.parametrize("cfg,fragments", ERROR_CASES, ids=[f"{i}" for i in range(len(ERROR_CASES))])
def test_config_errors_name_the_key(cfg, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("config: ")
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize("text,fragments", [
    ("merge_method: x\nmodels: [{model: a}]\ndtype: bf16\ndtype: fp16\n", ["duplicate key 'dtype'", "line 4"]),
    ("", ["empty config"]),
    ("- a\n- b\n", ["expected a mapping at top level"]),
    ("merge_method: x\nmodels: [{model: a}\n", ["invalid YAML at line"]),
])
def test_yaml_level_errors(text, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(text)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_valid_edge_cases_are_accepted():
    # base model listed in its slice; same model in two slices; explicit filter "*"
    c = load_config(_with(SLICE, slices__0__base_model="a", parameters={"t": {"filter": "*", "value": 0.3}}))
    assert c.slices[0].base_model == "a"
    assert load_config(_with(BASE, tokenizer_source="b")).tokenizer_source == "b"
    assert load_config(_with(BASE, base_model="a", tokenizer_source="base")).tokenizer_source == "base"
    assert load_config(_with(BASE, chat_template="{{ messages }}")).chat_template == "{{ messages }}"


# ------------------------------------------------------------- cross-check mergekit


def _random_scalar(rng: random.Random):
    kind = rng.randrange(5)
    if kind == 0:
        return rng.uniform(-2, 2)
    if kind == 1:
        return rng.randrange(-3, 4)
    if kind == 2:
        return rng.random() < 0.5
    return rng.choice(["a", "bb", "ccc"]) if kind == 3 else round(rng.uniform(0, 1), 3)


def _random_gradient(rng: random.Random):
    if rng.random() < 0.3:
        return _random_scalar(rng)
    n = rng.randrange(1, 8)
    numeric = rng.random() < 0.7
    return [rng.uniform(-1, 1) if numeric and rng.random() < 0.6 else
            (rng.randrange(-5, 6) if numeric else _random_scalar(rng)) for _ in range(n)]


FILTERS = [None, "*", "mlp", "self_attn", "q_proj", "layers.1", "norm", ""]
TENSORS = ["model.layers.1.mlp.up_proj.weight", "model.layers.12.self_attn.q_proj.weight",
           "model.norm.weight", "lm_head.weight", ""]


def _random_setting(rng: random.Random):
    r = rng.random()
    if r < 0.4:
        return _random_gradient(rng)
    entries = [{"value": _random_gradient(rng), "filter": rng.choice(FILTERS)} for _ in range(rng.randrange(1, 4))]
    for e in entries:
        if e["filter"] is None and rng.random() < 0.5:
            del e["filter"]
    return entries[0] if r < 0.55 else entries


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return type(a) is type(b) and (a == b or (math.isnan(a) and math.isnan(b)))
    return type(a) is type(b) and a == b


def test_evaluate_setting_agrees_with_mergekit():
    mk_config = pytest.importorskip("mergekit.config")
    from pydantic import TypeAdapter

    adapter = TypeAdapter(mk_config.ParameterSetting)
    rng = random.Random(1234)
    checked = 0
    for _ in range(600):
        raw = _random_setting(rng)
        ours = parse_setting(raw)
        theirs = adapter.validate_python(raw)
        for _ in range(6):
            t = rng.choice([0.0, 1.0, rng.random(), layer_t(rng.randrange(9), 9)])
            name = rng.choice(TENSORS)
            a = evaluate_setting(ours, name, t)
            b = mk_config.evaluate_setting(name, theirs, t, validate=lambda v: v)
            assert _same(a, b), (raw, name, t, a, b)
            # with a float validator (what mergekit does for float parameters)
            if all(not isinstance(v, (str, bool)) for v in _leaves(raw)):
                a = evaluate_setting(ours, name, t, validate=float)
                b = mk_config.evaluate_setting(name, theirs, t, validate=float)
                assert _same(a, b), (raw, name, t, a, b)
            checked += 1
    assert checked == 3600


def _leaves(raw):
    if isinstance(raw, dict):
        return _leaves(raw["value"])
    if isinstance(raw, list):
        return [x for v in raw for x in _leaves(v)]
    return [raw]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_resolve_like_mergekit(name):
    """mergekit reads the same YAML, and its resolver gives the same values for every
    parameter / model / tensor / t we try."""
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.common import ModelReference
    from mergekit.merge_methods.base import ParameterScope, ParameterSpec
    from mergekit.parameter_resolver import resolve_parameter as mk_resolve

    text = EXAMPLES[name]
    ours = load_config(text)
    theirs = mk_config.MergeConfiguration.model_validate(yaml.safe_load(text))
    if theirs.models:  # mergekit turns `models:` into one slice of all models before resolving
        slices = [mk_config.OutputSliceDefinition(sources=[
            mk_config.InputSliceDefinition(model=m.model, layer_range=(0, 1), parameters=m.parameters)
            for m in theirs.models])]
    else:
        slices = theirs.slices
    names = {k for scope in _all_scopes(ours) for k in scope}
    assert names
    for index, out_slice in enumerate(slices):
        reader = mk_config.ConfigReader(config=theirs, t=0, slice_out=out_slice)
        models = [None] + [str(s.model) for s in out_slice.sources]
        for pname in sorted(names):
            spec = ParameterSpec(pname, object, ParameterScope.INPUT, default=None)
            for model in models:
                for tensor in TENSORS[:-1] + ["model.layers.3.self_attn.o_proj.weight"]:
                    for t in np.linspace(0, 1, 9):
                        mine = resolve_parameter(ours, pname, tensor_name=tensor, t=float(t), model=model,
                                                 slice_index=index if ours.slices else None)
                        ref = mk_resolve(
                            spec, tuple(reader.parameter_sources(ModelReference.parse(model) if model else None)),
                            tensor_name=tensor, t=float(t))
                        if isinstance(ref, str) and isinstance(mine, float):
                            ref = float(ref)  # YAML 1.1 "1e-1" string vs our YAML 1.2 float
                        assert _same(mine, ref), (pname, model, tensor, t, mine, ref)


def _all_scopes(c: MergeConfig):
    scopes = [c.parameters or {}]
    for m in c.models or ():
        scopes.append(m.parameters or {})
    for s in c.slices or ():
        scopes.append(s.parameters or {})
        scopes += [src.parameters or {} for src in s.sources]
    return scopes


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_mergekit_reads_our_yaml(name):
    mk_config = pytest.importorskip("mergekit.config")
    ours = load_config(EXAMPLES[name])
    theirs = mk_config.MergeConfiguration.model_validate(yaml.safe_load(ours.to_yaml()))
    assert sorted(str(m) for m in theirs.referenced_models()) == sorted(ours.referenced_models())
    assert theirs.merge_method == ours.merge_method and theirs.dtype == ours.dtype


def test_chat_template_must_be_jinja_text():
    from pymerge.config import load_config
    from pymerge.errors import ConfigError

    base = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1.0}}]}
    ok = load_config({**base, "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"})
    assert ok.chat_template.startswith("{%")
    named = load_config({**base, "chat_template": "chatml"})
    assert "<|im_start|>" in named.chat_template_text()
    with pytest.raises(ConfigError, match="chat_template"):
        load_config({**base, "chat_template": "alpaca"})
