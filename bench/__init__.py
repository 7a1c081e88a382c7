"""Benchmarks: offline throughput (vs HF transformers), shared-prefix cache, attention, serving."""
