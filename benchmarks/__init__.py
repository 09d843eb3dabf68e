"""modaldiag benchmarks: run with `make bench` (or `python -m benchmarks.run --quick`)."""
