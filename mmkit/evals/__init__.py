"""Benchmarks and metrics on the reference world."""
