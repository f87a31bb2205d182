"""Benchmarks: each module runs with one command and prints medians and ratios measured in the same run."""
