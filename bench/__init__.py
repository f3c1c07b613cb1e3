"""Benchmarks: lora-scripts against named baselines measured in the same run (see BENCHMARKS.md)."""
