"""Bundled example models and data (no download): used by ``examples/``, the tests and the benchmarks."""
