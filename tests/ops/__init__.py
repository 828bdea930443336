"""Tests of the tensor-level ops (pymerge.ops): Philox, exact top-k, sign consensus."""
