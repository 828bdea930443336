"""Philox4x32-10 (pymerge.ops.philox): Random123 known-answer vectors, the stream layout, split invariance,
uniformity, keep-masks and the FNV-1a tensor-name hash."""

from __future__ import annotations

import math

import pytest
import torch

from pymerge.ops import keep_mask, name_hash, philox4x32_10, random_words

# Random123's kat_vectors for philox4x32_10: (counter, key, expected output)
KATS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_known_answer_vectors(counter, key, expected):
    out = philox4x32_10((torch.tensor([counter[0]], dtype=torch.int64), *counter[1:]), key)
    assert tuple(int(w[0]) for w in out) == expected


def test_known_answers_vectorized_over_counters():
    """One call over a batch of counters (all words as tensors) gives each counter's own output."""
    key = KATS[2][1]
    counters = torch.tensor([KATS[2][0], KATS[0][0], KATS[1][0]], dtype=torch.int64)
    out = torch.stack(philox4x32_10(tuple(counters[:, i] for i in range(4)), key), dim=1)
    assert tuple(int(x) for x in out[0]) == KATS[2][2]
    for row, c in zip(out[1:], counters[1:]):
        single = philox4x32_10((c[0:1], int(c[1]), int(c[2]), int(c[3])), key)
        assert [int(x) for x in row] == [int(w[0]) for w in single]
    assert out.min() >= 0 and out.max() <= 0xFFFFFFFF


@pytest.mark.parametrize("seed", [0, 12345, (7 << 32) | 99])
@pytest.mark.parametrize("element", [0, 1, 6, 4 * (1 << 32) + 3, (1 << 40) + 2])
def test_stream_layout(seed, element):
    """word(e) = output (e % 4) of Philox(counter = (block lo, block hi, model, name_hash), key = seed halves)."""
    model, name = 5, "model.layers.7.mlp.gate_proj.weight"
    block = element // 4
    out = philox4x32_10((torch.tensor([block & 0xFFFFFFFF]), block >> 32, model, name_hash(name)),
                        (seed & 0xFFFFFFFF, seed >> 32))
    assert int(random_words(seed, model, name, element, 1)[0]) == int(out[element % 4][0])


@pytest.mark.parametrize("start", [0, 1, 2, 3, 4, 5, 1021, (1 << 34) - 3])
def test_random_words_identical_for_any_split(start):
    count = 257
    whole = random_words(42, 3, "w", start, count)
    assert whole.shape == (count,) and whole.dtype == torch.int64
    g = torch.Generator().manual_seed(start % 1000)
    for _ in range(5):
        cuts = sorted(set(torch.randint(0, count + 1, (6,), generator=g).tolist()) | {0, count})
        parts = [random_words(42, 3, "w", start + a, b - a) for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(parts), whole)
    singles = torch.cat([random_words(42, 3, "w", start + i, 1) for i in range(0, count, 37)])
    assert torch.equal(singles, whole[::37])
    assert random_words(42, 3, "w", start, 0).numel() == 0


def test_streams_differ_by_seed_model_and_name():
    ref = random_words(1, 0, "a", 0, 64)
    for other in (random_words(2, 0, "a", 0, 64), random_words(1, 1, "a", 0, 64), random_words(1, 0, "b", 0, 64),
                  random_words(1 << 32, 0, "a", 0, 64)):
        assert (other != ref).float().mean() > 0.9


def test_uniformity():
    """u = (word >> 8) / 2**24 over 2**18 draws: mean, variance and every bit's frequency within 6 sigma."""
    n = 1 << 18
    words = random_words(2024, 1, "model.embed_tokens.weight", 0, n)
    u = (words >> 8).double() / float(1 << 24)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 6 * math.sqrt(1 / 180 / n)  # Var of (u - 1/2)^2 is 1/180
    bits = (words.unsqueeze(1) >> torch.arange(32)) & 1
    assert ((bits.double().mean(0) - 0.5).abs() < 6 * math.sqrt(0.25 / n)).all()
    for lane in range(4):  # each of the four output words of a block
        assert abs(u[lane::4].mean().item() - 0.5) < 6 * math.sqrt(1 / 12 / (n // 4))


def test_keep_mask_is_u24_below_fp32_probability():
    n = 5000
    u24 = (random_words(9, 2, "t", 10, n) >> 8).double()
    for p in (0.0, 1e-9, 0.1, 0.3, 0.5, 0.999, 1.0):
        expect = u24 < float(torch.tensor(p, dtype=torch.float32)) * (1 << 24)
        assert torch.equal(keep_mask(9, 2, "t", 10, n, p), expect)
    assert not keep_mask(9, 2, "t", 10, n, 0.0).any()
    assert keep_mask(9, 2, "t", 10, n, 1.0).all()
    probs = torch.linspace(0, 1, n, dtype=torch.float32)
    assert torch.equal(keep_mask(9, 2, "t", 10, n, probs), u24 < probs.double() * (1 << 24))


def _fnv1a_32(data: bytes) -> int:
    """FNV-1a, 32 bits: offset basis 2166136261, prime 16777619 (the published definition)."""
    h = 2166136261
    for byte in data:
        h ^= byte
        h = (h * 16777619) % (1 << 32)
    return h


@pytest.mark.parametrize("name,expected", [
    ("", 0x811C9DC5),  # the offset basis
    ("a", 0xE40C292C),  # FNV test-suite vectors
    ("foobar", 0xBF9CF968),
])
def test_name_hash_pinned(name, expected):
    assert name_hash(name) == expected == _fnv1a_32(name.encode())


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight", "blk.é.ü"])
def test_name_hash_matches_fnv1a_of_utf8(name):
    assert name_hash(name) == _fnv1a_32(name.encode("utf-8"))
    assert 0 <= name_hash(name) < 1 << 32
