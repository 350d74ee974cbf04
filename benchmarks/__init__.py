"""Benchmarks of chatstate: `make bench` runs them all and merges their figures into results.json."""
