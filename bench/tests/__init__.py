"""Tests of the benches themselves: sampled runs and their verdicts (tests/ imports nothing from bench/)."""
