"""Benchmark: one I2Correlation branch with KL scoring (FOD inference's hot spot).

Compares, on the same inputs:
  materialised  the FOD model's own ops: full (B, H, N, N) logits, softmax, RBF target, sym-KL
  torch         fastad.kernels lean torch path (query blocks, analytic target)
  triton        fastad.kernels fused two-pass Triton kernel (CUDA only)
and checks each against the materialised result before timing it (parity before speed).

    python bench/bench_i2corr.py                      # default shapes for this device
    python bench/bench_i2corr.py --n 1024 4096 --batch 1 8 --out bench/results/i2corr_cpu.json

CPU timings on shared machines are noisy: compare the ratios within one run, not the absolute
times. GPU runs use triton.testing.do_bench (median); CPU runs torch.utils.benchmark (median).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fastad.kernels.i2corr import i2corr_attention
from fastad.models.fod import rbf_target, sym_kl
from fastad.utils import write_json


def materialised(q, k, v, sigma, grid, scale):
    attn = torch.softmax(torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale, dim=-1)
    out = torch.matmul(attn, v.float()).to(q.dtype)
    return out, sym_kl(rbf_target(sigma, grid), attn)


def make_inputs(b, h, side, dh, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = side * side
    q, k, v = (torch.randn(b, h, n, dh, generator=g).to(device, dtype) for _ in range(3))
    sigma = (torch.rand(b, h, n, 2, generator=g) * 1.9 + 0.05).to(device)
    return q, k, v, sigma, (side, side)


def timed(fn, device) -> float:
    """Median seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, quantiles=[0.5]) / 1e3
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1.0).median


def peak_memory(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--side", type=int, nargs="+", default=None, help="grid side; N = side² (default 16 32 [64 128])")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--head-dim", type=int, nargs="+", default=[32, 64])
    p.add_argument("--dtype", nargs="+", default=None, help="float32 float16 bfloat16")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--out", help="write the JSON record here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sides = args.side or ([16, 32, 64, 128] if cuda else [16, 32])
    dtypes = [getattr(torch, d) for d in (args.dtype or (["float32", "float16", "bfloat16"] if cuda else ["float32"]))]
    backends = ["materialised", "torch"] + (["triton"] if cuda else [])
    rows = []
    for side in sides:
        for b in args.batch:
            for dh in args.head_dim:
                for dtype in dtypes:
                    q, k, v, sigma, grid = make_inputs(b, args.heads, side, dh, dtype, device)
                    scale = dh ** -0.5
                    n = side * side
                    elems = b * args.heads * n * n
                    ref = None
                    if elems * 4 * 6 < (torch.cuda.get_device_properties(device).total_memory * 0.8 if cuda else 16e9):
                        ref = materialised(q, k, v, sigma, grid, scale)
                    for backend in backends:
                        if backend == "materialised":
                            if ref is None:
                                rows.append({"side": side, "n": n, "batch": b, "head_dim": dh, "dtype": str(dtype),
                                             "backend": backend, "skipped": "does not fit in memory"})
                                continue
                            fn = lambda: materialised(q, k, v, sigma, grid, scale)  # noqa: E731
                        else:
                            fn = lambda be=backend: i2corr_attention(q, k, v, sigma, grid, scale=scale, backend=be)  # noqa: E731
                        res = fn()
                        row = {"side": side, "n": n, "batch": b, "head_dim": dh, "dtype": str(dtype), "backend": backend}
                        if ref is not None and backend != "materialised":
                            row["max_abs_err_out"] = float((res.out.float() - ref[0].float()).abs().max())
                            row["max_abs_err_kl"] = float((res.kl - ref[1]).abs().max())
                        row["median_s"] = timed(fn, device)
                        row["peak_bytes"] = peak_memory(fn, device)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    record = {
        "benchmark": "i2corr_attention (one branch, with KL + entropy)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "heads": args.heads,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "rows": rows,
    }
    if args.out:
        write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
