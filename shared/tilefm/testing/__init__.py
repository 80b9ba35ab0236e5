"""Checks the tests and benchmarks apply to outputs (`seams`: does stitching leave seams?)."""
