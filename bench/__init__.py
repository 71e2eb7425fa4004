"""Alloy's benchmarks: `python -m bench NAME [--quick] [--json]`, or `make bench` for all."""
