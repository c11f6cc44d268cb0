"""Benchmarks: together_async side by side with the official `together` SDK and the raw limit.

`python -m benchmarks [--quick]` runs them all (see run.py); each `bench_*.py` is one workload.
"""
