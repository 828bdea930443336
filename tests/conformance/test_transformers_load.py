"""A pymerge output is a checkpoint transformers and safetensors load as they are, and it runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers.mergekit_runner import load_state

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: the tensors are tiny, and spinning OpenMP workers slow a busy machine down a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """from_pretrained's dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@pytest.mark.parametrize("dtype_name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_merged_checkpoint_loads_and_runs(dtype_name: str, dtype: torch.dtype, tiny_family, tmp_path: Path) -> None:
    import pymerge
    from safetensors import safe_open

    config = {
        "merge_method": "ties",
        "base_model": str(tiny_family.base),
        "dtype": dtype_name,
        "parameters": {"lambda": 1.1},
        "models": [
            {"model": str(p), "parameters": {"weight": w, "density": d}}
            for p, w, d in zip(tiny_family.experts, (0.7, 1.3, 0.45), (0.3, 0.55, 0.45))
        ],
    }
    config_path = tmp_path / "merge.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    out = tmp_path / "merged"
    pymerge.merge(config_path, out, quiet=True)

    files = sorted(out.glob("*.safetensors"))
    assert files, f"no safetensors file written to {out}"
    for file in files:  # transformers refuses safetensors files without format metadata
        with safe_open(str(file), framework="pt") as f:
            assert (f.metadata() or {}).get("format") == "pt", f"{file.name}: metadata {f.metadata()}"
    written = load_state(out)  # safetensors.torch.load_file on every file
    base = load_state(tiny_family.base)
    assert set(written) == set(base)
    assert all(t.dtype == dtype for t in written.values()), {n: t.dtype for n, t in written.items()}

    model = transformers.AutoModelForCausalLM.from_pretrained(out, **_dtype_kwarg(dtype))
    assert type(model).__name__ == "LlamaForCausalLM"
    loaded = model.state_dict()
    assert set(loaded) == set(written)
    differ = [name for name, t in written.items() if not torch.equal(loaded[name], t)]
    assert not differ, f"transformers loaded different values for {differ}"

    ids = torch.tensor([[1, 5, 17, 130, 2], [1, 3, 4, 99, 64]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 5, model.config.vocab_size)
    assert torch.isfinite(logits.float()).all()
