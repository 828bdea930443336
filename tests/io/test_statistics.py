"""Statistics files (Fisher diagonals, Gram matrices): validated against the model, clear errors naming the
file, the tensor and the expected and found shapes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pymerge.errors import CheckpointError
from pymerge.io.statistics import FISHER, GRAM, StatisticsFile, StatisticsReader, expected_shape

SHAPES = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (3, 7), "scalar": ()}


def _save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_expected_shapes():
    assert expected_shape(FISHER, (7, 5)) == (7, 5)
    assert expected_shape(FISHER, ()) == ()
    assert expected_shape(GRAM, (7, 5)) == (5, 5)
    assert expected_shape(GRAM, (7,)) is None
    assert expected_shape(GRAM, (2, 3, 4)) is None


def test_fisher_file_views_match_what_was_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.rand(s, generator=g) for n, s in SHAPES.items()}
    tensors["a.bias"] = tensors["a.bias"].to(torch.bfloat16)
    f = StatisticsFile(_save(tmp_path / "f.safetensors", tensors), FISHER, "m1", SHAPES)
    assert sorted(f.names()) == sorted(SHAPES)
    for n, t in tensors.items():
        got = f.for_tensor(n)
        assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape)
        assert torch.equal(got, t)


def test_gram_file_may_leave_tensors_out(tmp_path):
    gram = torch.rand(5, 5)
    f = StatisticsFile(_save(tmp_path / "g.safetensors", {"a.weight": gram}), GRAM, "m1", SHAPES)
    assert torch.equal(f.for_tensor("a.weight"), gram)
    assert f.for_tensor("b.weight") is None
    assert f.for_tensor("a.bias") is None


def test_fisher_missing_tensor_is_an_error_naming_file_and_tensor(tmp_path):
    path = _save(tmp_path / "f.safetensors", {"a.weight": torch.rand(7, 5)})
    f = StatisticsFile(path, FISHER, "m1", SHAPES)
    with pytest.raises(CheckpointError) as e:
        f.for_tensor("b.weight")
    assert str(path) in str(e.value) and "'b.weight'" in str(e.value) and "'m1'" in str(e.value)


@pytest.mark.parametrize("kind,name,shape,expected", [
    (FISHER, "a.weight", (5, 7), "[7, 5]"),
    (FISHER, "a.bias", (8,), "[7]"),
    (GRAM, "a.weight", (7, 7), "[5, 5]"),
    (GRAM, "b.weight", (3, 3), "[7, 7]"),
])
def test_wrong_shape_names_file_tensor_expected_and_found(tmp_path, kind, name, shape, expected):
    path = _save(tmp_path / "s.safetensors", {name: torch.rand(shape)})
    with pytest.raises(CheckpointError) as e:
        StatisticsFile(path, kind, "m1", SHAPES)
    msg = str(e.value)
    assert str(path) in msg and f"'{name}'" in msg and expected in msg and str(list(shape)) in msg


def test_gram_for_a_vector_is_refused(tmp_path):
    path = _save(tmp_path / "g.safetensors", {"a.bias": torch.rand(7, 7)})
    with pytest.raises(CheckpointError, match="only for 2-D linear weights"):
        StatisticsFile(path, GRAM, "m1", SHAPES)


def test_unknown_name_is_refused(tmp_path):
    path = _save(tmp_path / "f.safetensors", {"c.weight": torch.rand(2, 2)})
    with pytest.raises(CheckpointError, match=r"'c\.weight' matches no tensor of model 'm1'"):
        StatisticsFile(path, FISHER, "m1", SHAPES)


def test_integer_statistics_are_refused(tmp_path):
    path = _save(tmp_path / "f.safetensors", {"a.bias": torch.ones(7, dtype=torch.int32)})
    with pytest.raises(CheckpointError, match="dtype I32"):
        StatisticsFile(path, FISHER, "m1", SHAPES)


def test_missing_and_corrupt_files(tmp_path):
    reader = StatisticsReader(base_dir=tmp_path / "cfg")
    with pytest.raises(CheckpointError) as e:
        reader.for_tensor("nope.safetensors", FISHER, "m1", SHAPES, "a.weight")
    assert "nope.safetensors" in str(e.value) and "not found" in str(e.value)
    assert str(tmp_path / "cfg" / "nope.safetensors") in str(e.value)  # both places are listed
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        reader.for_tensor(str(bad), FISHER, "m1", SHAPES, "a.weight")


def test_reader_resolves_relative_to_base_dir_and_caches(tmp_path):
    (tmp_path / "cfg").mkdir()
    _save(tmp_path / "cfg" / "f.safetensors", {n: torch.rand(s) for n, s in SHAPES.items()})
    reader = StatisticsReader(base_dir=tmp_path / "cfg")
    a = reader.open("f.safetensors", FISHER, "m1", SHAPES)
    assert reader.open("f.safetensors", FISHER, "m1", SHAPES) is a
    assert reader.for_tensor(None, FISHER, "m1", SHAPES, "a.weight") is None
    assert tuple(reader.for_tensor("f.safetensors", FISHER, "m1", SHAPES, "b.weight").shape) == (3, 7)


# ------------------------------------------------------------------ statistics_helper: computing the files


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)]  # [batch, seq, features]


def test_gram_matrices_are_input_gram_per_row():
    from pymerge.statistics_helper import gram_matrices

    model, batches = _mlp().double(), [b.double() for b in _batches()]
    grams = gram_matrices(model, batches)
    x0 = torch.cat([b.reshape(-1, 5) for b in batches])
    x2 = torch.tanh(model[0](x0)).detach()
    assert sorted(grams) == ["0.weight", "2.weight"]
    assert torch.allclose(grams["0.weight"].double(), x0.T @ x0 / x0.shape[0], atol=1e-6)
    assert torch.allclose(grams["2.weight"].double(), x2.T @ x2 / x2.shape[0], atol=1e-6)


@pytest.mark.parametrize("per_example", [False, True])
def test_fisher_diagonals_follow_mergelm(per_example):
    from pymerge.statistics_helper import fisher_diagonals

    model = _mlp().double()
    batches = [b[:, 0].double() for b in _batches()]  # [batch, features] -> logits [batch, 3]
    fis = fisher_diagonals(model, batches, per_example=per_example, prefix="net.")
    expect = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    groups = [b[i:i + 1] for b in batches for i in range(b.shape[0])] if per_example else batches
    for x in groups:  # squared gradient of sum_examples sum_y sqrt(p^_y) log p_y, p^ detached
        model.zero_grad()
        logp = torch.log_softmax(model(x), dim=-1)
        (logp.detach().exp().sqrt() * logp).sum().backward()
        for n, p in model.named_parameters():
            expect[n] += p.grad ** 2
    assert sorted(fis) == sorted("net." + n for n in expect)
    for n, e in expect.items():
        assert torch.allclose(fis["net." + n].double(), e / 7, rtol=1e-5, atol=1e-12), n
    if not per_example:  # the batch-level (reference) and per-example Fishers differ
        other = fisher_diagonals(model, batches, per_example=True)
        assert not torch.allclose(other["0.weight"], fis["net.0.weight"])


def test_saved_statistics_validate_against_the_model(tmp_path):
    from pymerge.statistics_helper import fisher_diagonals, gram_matrices, save_statistics

    model = _mlp()
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    batches = [b[:, 0] for b in _batches()]
    f = StatisticsFile(save_statistics(fisher_diagonals(model, batches), tmp_path / "f.safetensors"), FISHER,
                       "m", shapes)
    g = StatisticsFile(save_statistics(gram_matrices(model, batches), tmp_path / "g.safetensors"), GRAM, "m", shapes)
    assert sorted(f.names()) == sorted(shapes) and sorted(g.names()) == ["0.weight", "2.weight"]
