"""Test helpers shared by several test modules (reference runners, checkpoint loading)."""
