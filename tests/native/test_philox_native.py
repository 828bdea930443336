"""pymerge._C Philox stream (via pymerge.ops.native_cpu) against its pure-torch twin pymerge.ops.philox, bit for bit:
Random123 known-answer vectors, 24-bit uniforms and keep-masks on unaligned ranges, many seeds, models and
tensor names, block counters above 2^32, and the binding's argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from pymerge._native import native_module, native_unavailable_reason
from pymerge.ops.philox import keep_mask, name_hash, random_words

_C = native_module()
pytestmark = pytest.mark.skipif(_C is None, reason=f"pymerge._C is not built: {native_unavailable_reason()}")

# Random123's kat_vectors for philox4x32_10 (the same vectors tests/ops/test_philox.py checks the twin with).
KATS = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# (seed, model): 64-bit seeds with both key words in use, negative seeds (taken as 64-bit two's complement
# by both sides) and models past 2^32 (reduced mod 2^32 by both sides).
STREAMS = [(0, 0), (1, 1), (42, 7), (2**32 - 1, 3), (2**32, 0), (0xDEADBEEFCAFEF00D, 2**32 - 1), (-1, 5),
           (-(2**40) - 3, 2**32 + 9), (2**63 + 12345, 11)]
# (start, count): unaligned to 4 at either end, empty, shorter than one Philox block, several 64K OpenMP
# blocks, and a start whose Philox block number needs the counter's high word (block >= 2^32).
RANGES = [(0, 0), (0, 1), (3, 1), (1, 2), (2, 5), (5, 1001), (4, 4096), (7, 65537), (131071, 200003),
          (2**34 + 1, 70001), (2**34 - 3, 9)]


def _native():
    from pymerge.ops import native_cpu

    return native_cpu


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_known_answer_vectors(counter, key, expected):
    assert _native().philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("seed,model", STREAMS)
def test_uniform24_matches_twin(seed, model):
    names = ["model.embed_tokens.weight", "layers.0.mlp.up_proj.weight", "", "é"]
    for r, (start, count) in enumerate(RANGES):
        name = names[r % len(names)]
        got = _native().philox_uniform24(seed, model, name, start, count)
        want = random_words(seed, model, name, start, count) >> 8
        assert got.dtype == torch.int32 and got.shape == (count,)
        bad = torch.nonzero(got.long() != want)
        assert bad.numel() == 0, (
            f"seed {seed} model {model} name {name!r} [{start}, +{count}): {bad.numel()} words differ, "
            f"first at {int(bad[0])}: got {int(got[bad[0]])}, twin {int(want[bad[0]])}")


def test_uniform24_random_ranges_and_split_invariance():
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        start = int(torch.randint(0, 2**40, (1,), generator=g))
        count = int(torch.randint(0, 3000, (1,), generator=g))
        seed = int(torch.randint(-(2**62), 2**62, (1,), generator=g))
        model = int(torch.randint(0, 2**32, (1,), generator=g))
        whole = _native().philox_uniform24(seed, model, "t", start, count)
        assert torch.equal(whole.long(), random_words(seed, model, "t", start, count) >> 8)
        cut = int(torch.randint(0, count + 1, (1,), generator=g))
        parts = torch.cat([_native().philox_uniform24(seed, model, "t", start, cut),
                           _native().philox_uniform24(seed, model, "t", start + cut, count - cut)])
        assert torch.equal(parts, whole)
    # different tensor names and models give different streams
    a = _native().philox_uniform24(1, 0, "a", 0, 64)
    assert not torch.equal(a, _native().philox_uniform24(1, 0, "b", 0, 64))
    assert not torch.equal(a, _native().philox_uniform24(1, 1, "a", 0, 64))


@pytest.mark.parametrize("seed,model", STREAMS[::2])
def test_keep_mask_matches_twin(seed, model):
    probs = [0.0, 1e-7, 0.1, 0.5, 0.9, 0.9999999, 1.0, 1.5, -0.25, 1 / 3]
    for r, (start, count) in enumerate(RANGES):
        count = min(count, 70001)
        for prob in probs[r % 3::3] + [0.5]:
            got = _native().philox_keep_mask(seed, model, "w", start, count, prob)
            want = keep_mask(seed, model, "w", start, count, prob)
            assert got.dtype == torch.bool and got.shape == (count,)
            bad = torch.nonzero(got != want)
            assert bad.numel() == 0, f"prob {prob} seed {seed} [{start}, +{count}): first mismatch at {int(bad[0])}"


def test_keep_mask_is_u_below_prob():
    """The mask is exactly u24 < fp32(prob) * 2^24 for the native uniforms (ties at the limit excluded)."""
    u = _native().philox_uniform24(9, 2, "x", 11, 100003)
    for prob in (0.3, 0.7):
        limit = float(torch.tensor(prob, dtype=torch.float32)) * 2**24
        assert torch.equal(_native().philox_keep_mask(9, 2, "x", 11, 100003, prob), u.double() < limit)
    # the limit itself is not kept: a prob whose limit is exactly some u24 in the stream
    prob = float(u[5]) / 2**24
    mask = _native().philox_keep_mask(9, 2, "x", 11, 100003, prob)
    assert not bool(mask[5]) and bool(mask[u < u[5]].all())


def test_argument_errors():
    out = torch.empty(8, dtype=torch.int32)
    with pytest.raises(ValueError, match="model: must be in"):
        _C.philox_uniform24(0, 2**32, 0, 0, 8, out.data_ptr())
    with pytest.raises(ValueError, match="name_hash: must be in"):
        _C.philox_uniform24(0, 0, -1, 0, 8, out.data_ptr())
    with pytest.raises(ValueError, match="start: first element"):
        _C.philox_uniform24(0, 0, 0, -4, 8, out.data_ptr())
    with pytest.raises(ValueError, match="count: element count"):
        _C.philox_uniform24(0, 0, 0, 0, -1, out.data_ptr())
    with pytest.raises(ValueError, match="too large"):
        _C.philox_uniform24(0, 0, 0, 2**62, 2**61, out.data_ptr())
    with pytest.raises(ValueError, match="out_ptr: null pointer"):
        _C.philox_keep_mask(0, 0, 0, 0, 8, 0.5, 0)
    with pytest.raises(ValueError, match="prob: must be a probability"):
        _C.philox_keep_mask(0, 0, 0, 0, 8, math.nan, out.data_ptr())
    with pytest.raises(ValueError, match="counter: expected 4 words"):
        _C.philox4x32_10([0, 0, 0], [0, 0])
    with pytest.raises(ValueError, match=r"key\[1\]: must be in"):
        _C.philox4x32_10([0, 0, 0, 0], [0, 2**32])
    with pytest.raises(TypeError, match="one float probability"):
        _native().philox_keep_mask(0, 0, "w", 0, 4, torch.full((4,), 0.5))
    _C.philox_uniform24(0, 0, name_hash("w"), 0, 0, 0)  # nothing to do: a null buffer is fine
