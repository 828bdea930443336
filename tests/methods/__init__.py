"""Tests of the merge methods (pymerge.methods) against the float64 oracles of reference.py."""
