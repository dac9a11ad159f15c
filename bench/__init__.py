"""Benchmarks (installed as ``fastad.bench``): `runtime` backs `fastad bench`; the bench_*.py
scripts and the pytest-benchmark suites (test_*.py, run with `pytest bench --benchmark-only`)
time single hot functions. Results worth keeping go to bench/results/."""
