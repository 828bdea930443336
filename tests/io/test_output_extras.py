"""config.json rewriting, tokenizer file copying, and the model card."""

import json
import re

import pytest
import yaml

from pymerge.errors import CheckpointError, MergeError
from pymerge.io.output_extras import TOKENIZER_FILES, copy_tokenizer_files, write_config_json, write_model_card


@pytest.fixture(autouse=True)
def _stay_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_config_dtype_rewritten(tmp_path):
    src = tmp_path / "src.json"
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "torch_dtype": "float32",
        "text_config": {"torch_dtype": "float32", "vocab_size": 10},
        "vision_config": {"hidden_size": 8, "text_config": {"dtype": "float16"}},
        "sub_configs": [{"torch_dtype": "float32"}, {"layers": 2}],
        "rope_scaling": None,
    }
    src.write_text(json.dumps(cfg))
    dst = tmp_path / "dst"
    dst.mkdir()
    write_config_json(src, dst, "bfloat16")
    out = json.loads((dst / "config.json").read_text())
    expected = json.loads(json.dumps(cfg))
    expected["torch_dtype"] = "bfloat16"
    expected["text_config"]["torch_dtype"] = "bfloat16"
    expected["vision_config"]["text_config"]["dtype"] = "bfloat16"  # at any depth
    expected["sub_configs"][0]["torch_dtype"] = "bfloat16"
    assert out == expected  # "dtype" not added where absent; other sub-configs untouched


def test_config_new_style_dtype_key(tmp_path):
    src = tmp_path / "src.json"
    src.write_text(json.dumps({"dtype": "float16", "model_type": "qwen2"}))
    write_config_json(src, tmp_path, "float32")
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "dtype": "float32",
        "model_type": "qwen2",
        "torch_dtype": "float32",
    }


def test_config_errors_and_noop(tmp_path):
    write_config_json(None, tmp_path, "bfloat16")
    assert not (tmp_path / "config.json").exists()
    with pytest.raises(MergeError, match="'bf16'"):
        write_config_json(None, tmp_path, "bf16")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(CheckpointError, match="bad.json"):
        write_config_json(bad, tmp_path, "bfloat16")
    bad.write_text("[1]")
    with pytest.raises(CheckpointError, match="bad.json"):
        write_config_json(bad, tmp_path, "bfloat16")


def test_copy_tokenizer_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    present = ["tokenizer.json", "merges.txt", "generation_config.json"]
    for i, name in enumerate(present):
        (src / name).write_text(f"content {i}")
    (src / "blob").write_text("linked content")
    (src / "tokenizer_config.json").symlink_to("blob")  # Hub cache style: copy the content, not the link
    (src / "model.safetensors").write_bytes(b"not copied")
    copied = copy_tokenizer_files(src, dst)
    assert sorted(copied) == sorted(present + ["tokenizer_config.json"])
    assert set(copied) <= set(TOKENIZER_FILES)
    for i, name in enumerate(present):
        assert (dst / name).read_text() == f"content {i}"
    assert not (dst / "tokenizer_config.json").is_symlink()
    assert (dst / "tokenizer_config.json").read_text() == "linked content"
    assert sorted(p.name for p in dst.iterdir()) == sorted(copied)


def split_card(text):
    m = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert m, text
    return yaml.safe_load(m.group(1)), m.group(2)


def test_model_card(tmp_path):
    config_yaml = "merge_method: ties\nbase_model: org/base\nmodels:\n  - model: org/a\n    parameters: {weight: 0.5}\n"
    write_model_card(tmp_path, method="ties", models=["org/a", "/local/b"], base_model="org/base",
                     config_yaml=config_yaml)
    front, body = split_card((tmp_path / "README.md").read_text())
    assert front["base_model"] == "org/base"
    assert front["tags"] == ["merge", "pymerge"]
    assert "**ties**" in body and "`org/a`" in body and "`/local/b`" in body
    block = re.search(r"```yaml\n(.*?)\n```", body, re.S).group(1)
    assert yaml.safe_load(block) == yaml.safe_load(config_yaml)


@pytest.mark.parametrize("base", ["/abs/path/model", "./rel", "../up", "~/m", None, "a/b/c"])
def test_model_card_base_model_only_when_hub_name(tmp_path, base):
    write_model_card(tmp_path, method="linear", models=["x"], base_model=base, config_yaml="merge_method: linear")
    front, _ = split_card((tmp_path / "README.md").read_text())
    assert "base_model" not in front and front["tags"] == ["merge", "pymerge"]


def test_model_card_local_dir_is_not_a_hub_name(tmp_path):
    (tmp_path / "mybase").mkdir()  # cwd is tmp_path: "mybase" names a local directory
    write_model_card(tmp_path, method="slerp", models=[], base_model="mybase", config_yaml="x: 1")
    front, _ = split_card((tmp_path / "README.md").read_text())
    assert "base_model" not in front
    write_model_card(tmp_path, method="slerp", models=[], base_model="1.0", config_yaml="x: 1")
    front, _ = split_card((tmp_path / "README.md").read_text())
    assert front["base_model"] == "1.0"  # quoted: stays a string in YAML


def test_model_card_config_with_backticks(tmp_path):
    cfg = "# a ``` fence\n# and ```` a longer one\nmerge_method: dare_ties\n"
    write_model_card(tmp_path, method="dare_ties", models=["a"], base_model=None, config_yaml=cfg)
    _, body = split_card((tmp_path / "README.md").read_text())
    block = re.search(r"`````yaml\n(.*?)\n`````", body, re.S).group(1)
    assert block + "\n" == cfg
