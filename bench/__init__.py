"""Benchmarks of the broker and its baselines; ``python -m bench --help``."""
