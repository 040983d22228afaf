"""Benchmarks of ragbeam; `measure` and `generate` are also used by the memory tests."""
