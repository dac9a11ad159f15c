"""Benchmark: post-processing, C++ module (fastad._postprocess) vs the numpy/scipy path.

A pytest-benchmark suite (not part of `make test`: pytest only collects tests/). Each case checks
parity (C++ vs numpy/scipy) before it times anything. Ops on one S x S map, S = 256 and 1024:
  blur       gaussian_blur, sigma 4 (the model's final smoothing)
  upsample   (S/8, S/8) -> (S, S) bilinear, align_corners=True (FOD's patch grid -> image)
  regions    8-connected regions of the blurred map above its 99th percentile

    .venv/bin/python -m pytest bench/bench_postprocess.py          # pytest-benchmark table
    .venv/bin/python bench/bench_postprocess.py --out bench/results/postprocess_cpu_ratios.json

The script form runs the same suite timed in process CPU time (time.process_time: on a shared
machine, wall time also counts the waits for a core) and prints/records the median python/cpp
ratio per case. Compare the ratios within one run, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import fastad.postprocess as pp

ATOL = 1e-5
SIZES = [256, 1024]
BACKENDS = ["python", "cpp"]
pytestmark = pytest.mark.skipif(pp._cpp is None, reason="fastad._postprocess not built")


def anomaly_like_map(side: int, seed: int = 0) -> np.ndarray:
    """Smooth random field with a few bright blobs: regions of realistic size and count."""
    rng = np.random.default_rng(seed)
    small = rng.random((side // 8, side // 8)).astype(np.float32)
    return pp.upsample_bilinear(small, (side, side), backend="python")


def case_inputs(op: str, side: int):
    amap = anomaly_like_map(side)
    if op == "blur":
        return (amap,), {"sigma": 4.0}
    if op == "upsample":
        return (amap[:: 8, :: 8].copy(), (side, side)), {"align_corners": True}
    blurred = pp.gaussian_blur(amap, backend="python")
    return (blurred > np.quantile(blurred, 0.99), blurred), {"connectivity": 8}


OPS = {"blur": pp.gaussian_blur, "upsample": pp.upsample_bilinear, "regions": pp.regions}


def check_parity(op: str, args, kwargs):
    got = OPS[op](*args, **kwargs, backend="cpp")
    want = OPS[op](*args, **kwargs, backend="python")
    if op == "regions":
        assert got == want and len(got) > 0
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", SIZES)
@pytest.mark.parametrize("op", list(OPS))
def test_postprocess_speed(benchmark, op, side, backend):
    args, kwargs = case_inputs(op, side)
    check_parity(op, args, kwargs)
    benchmark.group = f"{op} {side}x{side}"
    benchmark(OPS[op], *args, **kwargs, backend=backend)


# ---------------------------------------------------------------------------------------------
# Script form: run the suite, report median ratios
# ---------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON record here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "bench.json"
        subprocess.run([sys.executable, "-m", "pytest", "-q", __file__, "--benchmark-only",
                        "--benchmark-timer=time.process_time", f"--benchmark-json={raw}"],
                       check=True)
        data = json.loads(raw.read_text())
    medians = {}
    for b in data["benchmarks"]:
        p_ = b["params"]
        medians[(p_["op"], p_["side"], p_["backend"])] = b["stats"]["median"]
    rows = []
    for op in OPS:
        for side in SIZES:
            py, cpp = medians[(op, side, "python")], medians[(op, side, "cpp")]
            rows.append({"op": op, "side": side, "python_median_s": py, "cpp_median_s": cpp,
                         "python_over_cpp": py / cpp})
            print(f"{op:9s} {side:5d}x{side:<5d} python {py * 1e3:9.3f} ms   cpp {cpp * 1e3:9.3f} ms"
                  f"   ratio {py / cpp:6.2f}x")
    if args.out:
        import scipy

        from fastad.utils import write_json

        write_json(args.out, {
            "benchmark": "post-processing, C++ module vs numpy/scipy (one map, float32)",
            "command": "python " + " ".join(sys.argv),
            "device": platform.processor() or platform.machine(),
            "cpu_threads": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "compiler": subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "timer": "pytest-benchmark median of process CPU time (time.process_time)",
            "rows": rows,
        })


if __name__ == "__main__":
    main()
