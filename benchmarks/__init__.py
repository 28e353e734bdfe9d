"""Benchmarks: scripts that print figures and ratios side by side (never unit tests)."""
