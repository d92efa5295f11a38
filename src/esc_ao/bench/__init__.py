"""Benchmarks: heavy runs with their own commands, writing JSON and Markdown to docs/results/."""
