"""Benchmarks of prefix_hooks against the base model and PEFT on the same weights.

Run ``python -m benchmarks.run`` from the repository root (``--quick`` for a smoke run,
``--output BENCHMARKS.md`` to write the results file).
"""
