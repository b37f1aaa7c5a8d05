"""Benchmarks (speed, memory, model quality); results go to docs/benchmarks.md with command and machine."""
