"""Tiny shapes and a fast timing for the benchmark harness tests."""

from __future__ import annotations

from fastpt.benchmarks import harness

TINY = {"rms_norm": {"x": (8, 32)}, "swiglu": {"gate": (8, 32), "up": (8, 32)},
        "rope": {"q": (1, 4, 8, 16), "k": (1, 2, 8, 16)}, "attention": {"q": (1, 2, 16, 32)},
        "attention_causal": {"q": (1, 2, 16, 32)},
        "int8_matmul": {"a": (32, 64), "b": (32, 64)},
        "int8_linear": {"x": (32, 64), "w": (24, 64)},
        "lora_linear": {"x": (8, 32), "w": (16, 32), "a": (4, 32), "b": (16, 4)},
        "linear": {"x": (8, 32), "w": (16, 32)}}
FAST = harness.Timing(budget_s=0.0, min_rounds=3, warmup=1)
