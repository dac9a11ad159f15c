"""Benchmark scripts and suites (not installed; tests import a script's helper as `bench.…`;
`fastad bench` itself is fastad/benchmark.py): the bench_*.py scripts, parity.py and the
pytest-benchmark suites (test_*.py, run with `pytest bench --benchmark-only`) time single hot
functions. Results worth keeping go to bench/results/."""
