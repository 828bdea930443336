"""``pymerge extract-lora``: the adapter loads in PEFT and its ΔW is the truncated SVD of the fine-tune's delta.

The fine-tune's task vectors have a known geometric spectrum σ_i = 0.7^i, so the float64 numpy truncated SVD
(the Eckart–Young optimum) is well separated from the next rank and the randomized SVD must land on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pymerge.cli import main
from pymerge.errors import ConfigError, MergeError
from pymerge.lora_extract import extract_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

BLOCK_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=37, hidden_size=24, intermediate_size=42, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _spectral_delta(shape, g: torch.Generator) -> torch.Tensor:
    """A float64 matrix with random singular vectors and singular values 0.05 * 0.7^i."""
    m, n = shape
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = 0.05 * 0.7 ** torch.arange(k, dtype=torch.float64)
    return (u * s) @ v.T


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base dir, fine-tuned dir): every 2-D weight of the fine-tune is base + a spectral delta."""
    root = tmp_path_factory.mktemp("extract")
    model = _llama()
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.add_(_spectral_delta(p.shape, g).float())
    model.save_pretrained(root / "ft")
    return root / "base", root / "ft"


def _deltas(base: Path, ft: Path) -> dict[str, np.ndarray]:
    b, f = load_file(str(base / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    return {n: f[n].double().numpy() - b[n].double().numpy() for n in b if b[n].dim() == 2}


def _truncated(delta: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    """float64 rank-r truncated SVD of ``delta`` and the Eckart–Young error sqrt(sum_{i>r} s_i^2)."""
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r], float(np.sqrt((s[r:] ** 2).sum()))


def _lora_deltas(out: Path) -> dict[str, np.ndarray]:
    """ΔW = (alpha / r) B @ A of every module of the adapter in ``out``, in the weight's layout."""
    cfg = json.loads((out / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / cfg["r"]
    sd = {k: v.double().numpy() for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    got = {}
    for k, a in sd.items():
        mod = k.removeprefix("base_model.model.")
        if mod.endswith(".lora_A.weight"):
            name = mod.removesuffix(".lora_A.weight") + ".weight"
            got[name] = s * sd[k.replace("lora_A", "lora_B")] @ a
        elif mod.endswith(".lora_embedding_A"):
            name = mod.removesuffix(".lora_embedding_A") + ".weight"
            got[name] = s * (sd[k.replace("lora_embedding_A", "lora_embedding_B")] @ a).T
    return got


def test_rank_r_is_the_truncated_svd_and_loads_in_peft(pair, tmp_path):
    base, ft = pair
    r = 5
    report = extract_lora(base, ft, tmp_path / "lora", rank=r, progress=False)
    out = Path(report.out_dir)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "CAUSAL_LM", r, r)
    assert sorted(cfg["target_modules"]) == sorted(BLOCK_MODULES)
    assert cfg["base_model_name_or_path"] == str(base)

    deltas, got = _deltas(base, ft), _lora_deltas(out)
    assert sorted(got) == sorted(n for n in deltas if ".layers." in n)  # blocks only: no embeddings, no lm_head
    for name, ours in got.items():
        best, ey = _truncated(deltas[name], r)
        err = np.linalg.norm(deltas[name] - ours)
        # Eckart–Young: no rank-r matrix does better than `ey`; the randomized SVD must be within 0.1% of it
        # (fp32 factors add ~1e-7 relative), and land on the optimum itself (the spectrum has a 0.7 gap).
        assert ey <= err <= 1.001 * ey, name
        assert np.linalg.norm(ours - best) <= 1e-4 * np.linalg.norm(best), name

    # PEFT loads it on the base, and its merge_and_unload is base + the ΔW we checked
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), out)
    merged = {k: v.double().numpy() for k, v in model.merge_and_unload().state_dict().items()}
    b = {k: v.double().numpy() for k, v in load_file(str(base / "model.safetensors")).items()}
    for name in b:
        want = b[name] + got.get(name, 0.0)
        np.testing.assert_allclose(merged[name], want, rtol=0, atol=1e-6, err_msg=name)


def test_full_rank_reproduces_the_finetune(pair, tmp_path):
    base, ft = pair
    out = tmp_path / "full"
    extract_lora(base, ft, out, rank=24, modules=["q_proj", "o_proj", "embed_tokens"], include_embeddings=True,
                 progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["embed_tokens", "o_proj", "q_proj"]
    deltas, got = _deltas(base, ft), _lora_deltas(out)
    assert sorted(got) == sorted(["model.embed_tokens.weight"] + [f"model.layers.{i}.self_attn.{m}.weight"
                                                                  for i in range(2) for m in ("q_proj", "o_proj")])
    for name, ours in got.items():
        # fp32 differences and fp32 factors: exact up to a few fp32 roundings of the O(0.05) delta
        np.testing.assert_allclose(ours, deltas[name], rtol=0, atol=2e-7, err_msg=name)
    # the embedding goes through PEFT's transposed lora_embedding layout and still loads and merges right
    model = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base), out)
    merged = model.merge_and_unload().state_dict()
    f = load_file(str(ft / "model.safetensors"))
    for name in got:
        torch.testing.assert_close(merged[name], f[name], rtol=0, atol=5e-7)


def test_rank_above_min_dimension_is_refused(pair, tmp_path):
    base, ft = pair
    with pytest.raises(ConfigError, match=r"--rank 13 is larger than min\(out, in\) = 12 of tensor "
                                          r"'model.layers.0.self_attn.k_proj.weight' \(shape \[12, 24\]\)"):
        extract_lora(base, ft, tmp_path / "x", rank=13, progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="no 2-D weight .* matches module 'nope'"):
        extract_lora(base, ft, tmp_path / "x", rank=2, modules=["q_proj", "nope"], progress=False)


def test_cli(pair, tmp_path):
    base, ft = pair
    runner = CliRunner()
    res = runner.invoke(main, ["extract-lora", str(base), str(ft), str(tmp_path / "o"), "--rank", "3", "-q",
                               "--modules", "v_proj,down_proj", "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    assert "rank-3 LoRA of 4 modules" in res.output
    sd = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    assert len(sd) == 8 and all(v.dtype == torch.bfloat16 for v in sd.values())
    # an existing non-empty output is kept unless --overwrite
    res = runner.invoke(main, ["extract-lora", str(base), str(ft), str(tmp_path / "o"), "--rank", "2", "-q"])
    assert res.exit_code == 1 and "error:" in res.output and "not empty" in res.output
    res = runner.invoke(main, ["extract-lora", str(base), str(ft), str(tmp_path / "o"), "--rank", "99", "-q"])
    assert res.exit_code == 1 and "error: --rank 99 is larger than min(out, in)" in res.output


def test_overwrite_error_type(pair, tmp_path):
    base, ft = pair
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep").write_text("x")
    with pytest.raises(MergeError, match="not empty"):
        extract_lora(base, ft, tmp_path / "o", rank=1, modules=["q_proj"], progress=False)
    assert (tmp_path / "o" / "keep").read_text() == "x"
