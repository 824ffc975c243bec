"""Benchmark scripts: each prints its figures next to a baseline and writes JSON."""
