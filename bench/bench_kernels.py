"""Kernel benchmark: one I2Correlation branch (attention output + RBF-target sym-KL + entropy).

Implementations timed on the same inputs:
  eager   the authors' formulation (xcyao00/FOD: `models/attention.py` + `losses.py`): σ and the
          squared-distance matrices repeated to (B, H, N, N), the RBF target with its
          1/(2πσσ) prefactor, normalised by a repeated row sum, KL terms with `+1e-4` logs
  lean    fastad.kernels lean torch path (cache-sized query blocks, one softmax per block,
          separable log-space target; without statistics it is PyTorch's fused SDPA)
  triton  fastad.kernels fused two-pass Triton kernel (CUDA only), autotuned over its grid (the
          chosen config is recorded); without statistics `i2corr_forward_triton` *is* SDPA, so
          that row is not timed twice
  sdpa    torch.nn.functional.scaled_dot_product_attention: plain attention, no statistics —
          the speed-of-light reference for the attention part

Training records (`"mode": "train"`, beside the inference records): forward + backward of one
branch with FOD's losses (mean output, Div¹ with the prior detached, Div² with the attention
detached, entropy) — "eager" is autograd through the authors' formulation above, "lean" the
fused O(N)-memory branch (`i2corr_attention(kl_grad="split")`, fastad.kernels.i2corr_grad),
"lean-compiled" the same with its blocks through torch.compile (what FOD training uses on the
CPU), "triton" the same function with impl="triton" — the forward kernel with SAVE_STATS and the
dk/dv and dq backward kernels (what FOD training uses on CUDA; CUDA only, skipped with a note on
the CPU); their gradients are compared with the lean branch's before timing. `--train-n` /
`--train-batch` restrict the training records to some of the swept shapes.

Issue 14's goals read off the table: with statistics, triton ≤ 3× sdpa ("× sdpa" column) and
≥ 10× faster than eager ("× eager"); N = 16384, B = 8 within 1 GB ("peak MB").

Before timing, every implementation's result is compared with the lean path's on the same
inputs (parity before speed; the lean path itself is tested against the float64 reference in
tests/test_kernels_i2corr.py) and the max abs error is stored in the record.

    python bench/bench_kernels.py                     # default shapes for this device
    python bench/bench_kernels.py --n 1024 --batch 1  # one shape
    python bench/bench_kernels.py --train eager lean triton --train-n 1024 4096 16384 --train-batch 1 8

Writes bench/results/kernels-<device>.json and a Markdown table beside it. GPU times are
triton.testing.do_bench medians; CPU times the median of repeated calls (≥ 3, ≥ 1 s). Peak
memory is the extra memory one call needs on top of its inputs: torch.cuda's peak counter on
GPU; on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) measured in a
fresh child process per record, so that no allocator cache from an earlier call hides memory.
CPU timings on shared machines are noisy: compare ratios within one run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastad.kernels import i2corr_attention
from fastad.kernels.i2corr import I2CorrOutput, i2corr_forward_lean, i2corr_forward_triton
from fastad.utils import atomic_path, library_versions, write_json

HEADS = 8
IMPLS = ("eager", "lean", "triton", "sdpa")
# Training records (forward + backward with the losses).
TRAIN_IMPLS = ("eager", "lean", "lean-compiled", "triton")


# --------------------------------------------------------------------------------------------
# The four implementations
# --------------------------------------------------------------------------------------------
def eager_i2corr(q, k, v, sigma, grid, scale, with_stats):
    """The authors' formulation, op for op (per head: no mean over heads, the caller's job)."""
    b, h, n, _ = q.shape
    attn = torch.softmax(torch.einsum("bhld,bhsd->bhls", q, k) * scale, dim=-1)
    out = torch.einsum("bhls,bhsd->bhld", attn, v)
    if not with_stats:
        return I2CorrOutput(out)
    target = eager_target(sigma, grid, b, h, n)
    attn = attn.float()
    entropy = torch.sum(-attn * torch.log(attn + 0.0001), dim=-1)
    return I2CorrOutput(out, kl_loss(target, attn) + kl_loss(attn, target), entropy)


def kl_loss(p, r):
    """The authors' `kl_loss` per query row (their mean over heads is the caller's job)."""
    return torch.sum(p * (torch.log(p + 0.0001) - torch.log(r + 0.0001)), dim=-1)


def eager_target(sigma, grid, b, h, n):
    """The authors' prior: σ and squared distances repeated to (B, H, N, N), the Gaussian with its
    1/(2πσσ) prefactor, divided by its repeated row sum."""
    wg = grid[1]
    pos = torch.arange(n, device=sigma.device)
    distances_y = (((pos // wg)[:, None] - (pos // wg)[None, :]) ** 2).float()
    distances_x = (((pos % wg)[:, None] - (pos % wg)[None, :]) ** 2).float()
    sigma1 = sigma[..., 0].unsqueeze(-1).repeat(1, 1, 1, n)
    sigma2 = sigma[..., 1].unsqueeze(-1).repeat(1, 1, 1, n)
    distances_y = distances_y.unsqueeze(0).unsqueeze(0).repeat(b, h, 1, 1)
    distances_x = distances_x.unsqueeze(0).unsqueeze(0).repeat(b, h, 1, 1)
    target = 1.0 / (2 * math.pi * sigma1 * sigma2) * torch.exp(
        -distances_y / (2 * sigma1 ** 2) - distances_x / (2 * sigma2 ** 2))
    return target / torch.unsqueeze(torch.sum(target, dim=-1), dim=-1).repeat(1, 1, 1, n)


def eager_i2corr_train(q, k, v, sigma, grid, scale):
    """The authors' training statistics of one branch, op for op: -> (out, Div¹, Div², entropy),
    Div¹ with the prior detached (reaches the attention), Div² with the attention detached
    (reaches σ), as their min-max trainer forms them."""
    b, h, n, _ = q.shape
    attn = torch.softmax(torch.einsum("bhld,bhsd->bhls", q, k) * scale, dim=-1)
    out = torch.einsum("bhls,bhsd->bhld", attn, v)
    target = eager_target(sigma, grid, b, h, n)
    div1 = kl_loss(target.detach(), attn) + kl_loss(attn, target.detach())
    div2 = kl_loss(target, attn.detach()) + kl_loss(attn.detach(), target)
    entropy = torch.sum(-attn * torch.log(attn + 0.0001), dim=-1)
    return out, div1, div2, entropy


def train_impl(impl, q, k, v, sigma, grid, scale) -> tuple[torch.Tensor, ...]:
    """Forward + backward of one branch with FOD's losses (output, Div¹, Div², entropy, each
    mean-reduced) -> the gradients of q, k, v, σ. "lean" is the fused O(N)-memory branch
    (`i2corr_attention(kl_grad="split")`, eager blocks; "lean-compiled" through torch.compile),
    "triton" the same branch with impl="triton" (the Triton forward and backward kernels)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sigma)]
    if impl == "eager":
        out, div1, div2, ent = eager_i2corr_train(*leaves, grid, scale)
    elif impl in ("lean", "lean-compiled"):
        out, div1, div2, ent = i2corr_attention(*leaves, grid, scale=scale, kl_grad="split",
                                                compiled=impl == "lean-compiled")
    elif impl == "triton":
        out, div1, div2, ent = i2corr_attention(*leaves, grid, scale=scale, kl_grad="split", impl="triton")
    else:
        raise ValueError(f"no training path for {impl!r}")
    (out.float().mean() - 0.5 * div1.mean() + 0.5 * div2.mean() - 0.5 * ent.mean()).backward()
    return tuple(t.grad for t in leaves)


def run_impl(impl, q, k, v, sigma, grid, scale, with_stats):
    if impl == "eager":
        return eager_i2corr(q, k, v, sigma, grid, scale, with_stats)
    if impl == "lean":
        return i2corr_forward_lean(q, k, v, sigma, grid, scale, with_stats)
    if impl == "triton":
        return i2corr_forward_triton(q, k, v, sigma, grid, scale, with_stats)
    if impl == "sdpa":
        return I2CorrOutput(F.scaled_dot_product_attention(q, k, v, scale=scale))
    raise ValueError(impl)


def make_inputs(n: int, b: int, dh: int, dtype: torch.dtype, device, seed: int = 0):
    """Random q, k, v and σ spanning FOD's range (≈1e-5 to 2) on a square-ish grid of N."""
    side = math.isqrt(n)
    grid = (side, n // side)
    if grid[0] * grid[1] != n:
        raise SystemExit(f"error: N = {n} is not a product of a square-ish grid")
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, HEADS, n, dh, generator=g).to(device, dtype) for _ in range(3))
    sigma = torch.exp(torch.empty(b, HEADS, n, 2).uniform_(math.log(1e-5), math.log(2.0), generator=g))
    return q, k, v, sigma.to(device), grid


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------
def median_ms(fn, device) -> float:
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < 1.0:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_cpu_peak_mb(spec: dict) -> float:
    """In a fresh process: extra peak RSS of one call over the RSS with inputs in place."""
    q, k, v, sigma, grid = make_inputs(spec["N"], spec["B"], spec["Dh"], getattr(torch, spec["dtype"]), "cpu")
    if spec.get("mode") == "train":
        call = lambda: train_impl(spec["impl"], q, k, v, sigma, grid, spec["Dh"] ** -0.5)  # noqa: E731
    else:
        call = lambda: run_impl(spec["impl"], q, k, v, sigma, grid, spec["Dh"] ** -0.5, spec["with_stats"])  # noqa: E731
    call()  # page in the code paths and thread pools; its memory goes back (see the parent's env)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark to the current RSS
    base = _rss_kb("VmRSS")
    call()
    return (_rss_kb("VmHWM") - base) / 1024


def peak_mem_mb(spec: dict, fn, device) -> float | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        # A fixed mmap threshold makes glibc return every freed buffer ≥ 64 kB to the OS, so the
        # warm-up call's memory cannot be reused unseen by the measured call.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                             capture_output=True, text=True, timeout=600, check=True)
        return float(res.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError) as exc:
        print(f"  (peak memory not measured: {exc})", file=sys.stderr)
        return None


def triton_config() -> str | None:
    """The config the I2Correlation autotuner picked for the last launch."""
    from fastad.kernels import i2corr

    best = getattr(getattr(i2corr, "_i2corr_fwd_autotuned", None), "best_config", None)
    return None if best is None else str(best)


def max_abs_err(res: I2CorrOutput, ref: I2CorrOutput) -> dict:
    err = {"out": float((res.out.float() - ref.out.float()).abs().max())}
    if res.kl is not None and ref.kl is not None:
        err["kl"] = float((res.kl - ref.kl).abs().max())
        err["entropy"] = float((res.entropy - ref.entropy).abs().max())
    return err


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
def device_slug(device) -> str:
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return "cpu"


def device_label(device) -> str:
    from fastad.benchmark import device_name

    return device_name(str(device))


def sweep(args, device) -> list[dict]:
    cuda = device.type == "cuda"
    impls = [i for i in args.impl if cuda or i != "triton"]
    if not cuda and "triton" in args.train:
        print("note: no triton training records on the CPU (the Triton backward runs on CUDA; its "
              "interpreter parity is tests/test_i2corr_grad_triton.py)", file=sys.stderr)
        args.train = [i for i in args.train if i != "triton"]
    records = []
    for n in args.n:
        for b in args.batch:
            for dtype_name in args.dtype:
                dtype = getattr(torch, dtype_name)
                q, k, v, sigma, grid = make_inputs(n, b, args.head_dim, dtype, device)
                scale = args.head_dim ** -0.5
                lean_stats = run_impl("lean", q, k, v, sigma, grid, scale, True)
                for with_stats in (True, False):
                    for impl in impls:
                        if (impl == "sdpa" and with_stats) or (impl == "triton" and not with_stats):
                            continue
                        spec = {"mode": "infer", "impl": impl, "N": n, "B": b, "H": HEADS,
                                "Dh": args.head_dim, "dtype": dtype_name, "with_stats": with_stats}
                        fn = lambda: run_impl(impl, q, k, v, sigma, grid, scale, with_stats)  # noqa: E731
                        try:
                            spec["max_abs_err_vs_lean"] = max_abs_err(fn(), lean_stats)
                            spec["ms"] = median_ms(fn, device)
                            spec["peak_mem_mb"] = peak_mem_mb(spec, fn, device)
                            if impl == "triton":
                                spec["triton_config"] = triton_config()
                        except torch.cuda.OutOfMemoryError:
                            spec.update(ms=None, peak_mem_mb=None, skipped="out of GPU memory")
                        except Exception as exc:  # noqa: BLE001 - one failing impl must not lose the sweep
                            spec.update(ms=None, peak_mem_mb=None, skipped=f"error: {type(exc).__name__}: {exc}"[:300])
                        if cuda:
                            torch.cuda.empty_cache()
                        records.append(spec)
                        print(json.dumps(spec), flush=True)
                if args.train and n in (args.train_n or args.n) and b in (args.train_batch or args.batch):
                    records += train_records(args, device, q, k, v, sigma, grid, scale)
    return records


def train_records(args, device, q, k, v, sigma, grid, scale) -> list[dict]:
    """`"mode": "train"` records: forward + backward of one branch with the losses; the
    gradients compared with the lean branch's before timing."""
    b, _, n, _ = q.shape
    records = []
    lean_grads = train_impl("lean", q, k, v, sigma, grid, scale)
    for impl in args.train:
        spec = {"mode": "train", "impl": impl, "N": n, "B": b, "H": HEADS, "Dh": args.head_dim,
                "dtype": str(q.dtype).removeprefix("torch."), "with_stats": True}
        fn = lambda: train_impl(impl, q, k, v, sigma, grid, scale)  # noqa: E731
        try:
            grads = fn()
            spec["max_abs_err_vs_lean"] = {name: float((g.float() - ref.float()).abs().max())
                                           for name, g, ref in zip(("dq", "dk", "dv", "dsigma"), grads, lean_grads)}
            spec["ms"] = median_ms(fn, device)
            spec["peak_mem_mb"] = peak_mem_mb(spec, fn, device)
        except torch.cuda.OutOfMemoryError:
            spec.update(ms=None, peak_mem_mb=None, skipped="out of GPU memory")
        except Exception as exc:  # noqa: BLE001 - one failing impl must not lose the sweep
            spec.update(ms=None, peak_mem_mb=None, skipped=f"error: {type(exc).__name__}: {exc}"[:300])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        records.append(spec)
        print(json.dumps(spec), flush=True)
    return records


def markdown(result: dict) -> str:
    lines = [f"# I2Correlation kernel benchmark — {result['device']}", "",
             f"`{result['command']}`", "",
             "ms = median per call; peak = extra memory of one call over its inputs; "
             "× eager = eager time / this time (same shape, dtype and stats); × sdpa = this time / "
             "SDPA's time on the same shape and dtype (SDPA computes no statistics).", "",
             "mode: infer = forward only; train = forward + backward of the branch with FOD's losses "
             "(the error column then compares gradients).", "",
             "| mode | N | B | dtype | stats | impl | ms | × eager | × sdpa | peak MB | × less memory | max abs err vs lean |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def key(r):
        return r.get("mode", "infer"), r["N"], r["B"], r["dtype"], r["with_stats"]

    eager = {key(r): r for r in result["records"] if r["impl"] == "eager"}
    sdpa = {(r["N"], r["B"], r["dtype"]): r.get("ms") for r in result["records"]
            if r["impl"] == "sdpa" and r.get("mode", "infer") == "infer"}
    for r in result["records"]:
        base = eager.get(key(r), {}).get("ms")
        base_mem = eager.get(key(r), {}).get("peak_mem_mb")
        less_mem = f"{base_mem / r['peak_mem_mb']:.1f}" if base_mem and r.get("peak_mem_mb") else "—"
        speedup = f"{base / r['ms']:.1f}" if base and r.get("ms") else "—"
        plain = sdpa.get((r["N"], r["B"], r["dtype"])) if r.get("mode", "infer") == "infer" else None
        vs_sdpa = f"{r['ms'] / plain:.2f}" if plain and r.get("ms") else "—"
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else r.get("skipped", "—")
        mem = f"{r['peak_mem_mb']:.1f}" if r.get("peak_mem_mb") is not None else "—"
        err = ", ".join(f"{k} {v:.1e}" for k, v in r.get("max_abs_err_vs_lean", {}).items())
        lines.append(f"| {r.get('mode', 'infer')} | {r['N']} | {r['B']} | {r['dtype']} "
                     f"| {'yes' if r['with_stats'] else 'no'} | {r['impl']} | {ms} | {speedup} | {vs_sdpa} | {mem} "
                     f"| {less_mem} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(child_cpu_peak_mb(json.loads(argv[1])))
        return 0
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096, 16384] if cuda else [1024, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32] if cuda else [1])
    p.add_argument("--dtype", nargs="+", default=["float32", "float16"] if cuda else ["float32"],
                   choices=["float32", "float16", "bfloat16"])
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--impl", nargs="*", default=list(IMPLS), choices=IMPLS,
                   help="inference records for these; none: --impl")
    p.add_argument("--train", nargs="*", default=list(TRAIN_IMPLS), choices=TRAIN_IMPLS,
                   help="training records (forward + backward with losses) for these; none: --train")
    p.add_argument("--train-n", type=int, nargs="+", help="training records only at these N (default: every --n)")
    p.add_argument("--train-batch", type=int, nargs="+",
                   help="training records only at these B (default: every --batch)")
    p.add_argument("--out", help="JSON path (default bench/results/kernels-<device>.json); "
                                 "the Markdown table goes beside it")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not cuda:
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    result = {"device": device_label(device), "versions": library_versions(),
              "command": " ".join(["python", "bench/bench_kernels.py", *argv]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "heads": HEADS, "head_dim": args.head_dim}
    result["records"] = sweep(args, device)
    out = Path(args.out or Path(__file__).parent / "results" / f"kernels-{device_slug(device)}.json")
    write_json(out, result)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
