"""Benchmarks of the experimental methods only (run from the repository root: python -m experiments.bench.NAME)."""
