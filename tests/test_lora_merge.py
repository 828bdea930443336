"""Low-rank (adapter) output of a merge: ``pymerge run CONFIG OUT --lora-rank R`` / ``merge_to_lora``.

Two PEFT adapters of one base (ranks 2 and 3) merged by task arithmetic: every changed module's merged
difference has rank <= 5, so a rank-5 adapter reproduces it (up to the fp32 merge and SVD), checked against the
float64 combination of PEFT's own merge_and_unload() and by loading the written adapter with PEFT itself.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from pymerge.cli import main
from pymerge.errors import ConfigError
from pymerge.lora_merge import merge_to_lora

from .io.test_lora_inputs import _llama, _make

peft = pytest.importorskip("peft")

W1, W2 = 0.7, 0.5


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_adapters")
    (root / "one").mkdir(), (root / "two").mkdir()
    base, ad1, m1 = _make(root / "one", _llama(), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj",
                                                                                                     "up_proj"]), seed=6)
    _, ad2, m2 = _make(root / "two", _llama(), peft.LoraConfig(r=3, lora_alpha=3, target_modules=["up_proj",
                                                                                                  "o_proj"]), seed=7)
    base_sd = load_file(str(base / "model.safetensors"))
    want = {n: base_sd[n] + W1 * (m1[n] - base_sd[n]) + W2 * (m2[n] - base_sd[n]) for n in base_sd}
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(ad1), "parameters": {"weight": W1}},
                      {"model": str(ad2), "parameters": {"weight": W2}}]}
    path = root / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path, base, base_sd, want


def test_rank_covering_the_merge_reproduces_it_and_loads_with_peft(two_adapters, tmp_path):
    cfg, base, base_sd, want = two_adapters
    res = CliRunner().invoke(main, ["run", str(cfg), str(tmp_path / "lora"), "--lora-rank", "5", "-q"])
    assert res.exit_code == 0, res.output
    assert "rank-5 LoRA adapter" in res.output
    assert not list(tmp_path.glob(".*pymerge*"))  # the temporary float32 merge is gone
    tensors = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    changed = sorted(n for n in base_sd if not torch.equal(want[n], base_sd[n]))
    assert changed and all(any(m in n for m in ("q_proj", "up_proj", "o_proj")) for n in changed)
    for name in changed:
        key = "base_model.model." + name[: -len(".weight")]
        delta = tensors[key + ".lora_B.weight"].double() @ tensors[key + ".lora_A.weight"].double()
        torch.testing.assert_close(delta, want[name] - base_sd[name], rtol=0, atol=2e-5)
    # PEFT loads it onto the base and merges it back to the merged model
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    for name in changed:
        torch.testing.assert_close(merged[name], want[name], rtol=0, atol=2e-5)


def test_lower_rank_is_the_best_approximation(two_adapters, tmp_path):
    """rank 2 < rank(up_proj's difference) = 5: the adapter's error equals the Eckart-Young optimum."""
    cfg, base, base_sd, want = two_adapters
    merge_to_lora(cfg, tmp_path / "lora2", rank=2, quiet=True)
    tensors = load_file(str(tmp_path / "lora2" / "adapter_model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    key = "base_model.model.model.layers.0.mlp.up_proj"
    approx = tensors[key + ".lora_B.weight"].double() @ tensors[key + ".lora_A.weight"].double()
    target = want[name] - base_sd[name]
    s = torch.linalg.svdvals(target)
    best = float(s[2:].square().sum().sqrt())
    assert float(torch.linalg.norm(approx - target)) <= best * (1 + 1e-3) + 1e-5


def test_needs_a_base_model(two_adapters, tmp_path):
    _, base, _, _ = two_adapters
    cfg = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match="needs base_model"):
        merge_to_lora(cfg, tmp_path / "out", rank=2, quiet=True)
    assert not (tmp_path / "out").exists()
