"""Benchmarks: one module each, run as ``./run bench NAME [options]`` (see bench/README.md)."""
