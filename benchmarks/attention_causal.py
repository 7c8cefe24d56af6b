"""Causal attention benchmark: see benchmarks/attention.py."""

from fastpt.benchmarks.attention import spec

SPEC = spec(causal=True)
