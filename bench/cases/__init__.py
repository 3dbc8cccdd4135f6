"""Benchmark cases, one module per op family (see bench/case.py)."""
