"""Profiling beside the pipeline: step timing, memory, OOM capture, sweeps, the GPU monitor, benchmarks.

Importing this package loads no torch: the GPU monitor runs in processes that only execute notebooks.
"""
