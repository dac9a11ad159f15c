"""Soak: many predictions through one Predictor per backend; memory, latency and repeatability
over time.

    python bench/soak.py --run runs/tiny --backend torch,torch-lean,onnx --predictions 10000 \
        --json bench/results/soak_cpu.json --png bench/results/soak_cpu.png

Inputs are image files of mixed sizes (32..512 px, non-square), formats (PNG, JPEG, BMP, TIFF)
and pixel types (gray, RGB, RGBA, 16-bit gray, 16-bit RGB TIFF), written once to a temp folder
and decoded on every call (the decoder is part of what soaks), in seeded random batches of 1-16.
`--predictions` counts images, per backend.

Per backend it reports:
- memory: resident set size (RSS, /proc/self/statm) after every call; growth = median RSS of the
  last 10 % of calls over the median of the 10 % right after warm-up (`--warmup`, default 10 %
  of the calls). Pass: < 5 %.
- repeatability: a fixed probe batch is predicted every `--probe-every` calls; every result must
  equal the first bit for bit (scores, maps, masks). Each image file's score is also compared
  across the different batches it appeared in (max |delta|, reported, not a pass criterion:
  batch composition changes the BLAS blocking).
- latency: per-image latency (call / batch size); p99 of the first and last quarter after warm-up,
  and their ratio ("drift"). Pass: ratio < 1.5 (a shared machine adds noise both ways). The same
  ratio over the process's CPU time per image (`p99_cpu_drift`, not a pass criterion) tells a
  predictor that slows down from a machine that got busier (wall time grows, CPU time does not);
  the load average at the start and end of each backend is recorded too.
The JSON holds the curves (per call: images so far, RSS MiB, latency ms, batch size); the PNG
plots RSS and a rolling p50/p99 latency against predictions for every backend.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fastad.benchmark import device_name
from fastad.runtime import Predictor
from fastad.utils import library_versions, write_json

FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP"), ("tif", "TIFF"))
KINDS = ("gray", "rgb", "rgba", "gray16", "rgb16")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_image_pool(folder: Path, n: int, seed: int) -> list[str]:
    """`n` image files of mixed sizes, formats and pixel types (seeded)."""
    import tifffile
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(32, 513, 2))
        kind = KINDS[i % len(KINDS)]
        ext, fmt = FORMATS[(i // len(KINDS)) % len(FORMATS)]
        base = rng.integers(0, 256, (h, w, 3)).astype(np.float64)
        if kind == "rgb16" or (kind == "gray16" and fmt not in ("PNG", "TIFF")):
            if kind == "rgb16":  # 16-bit RGB only TIFF stores; PIL cannot write it
                path = folder / f"{i:04d}_{kind}.tif"
                tifffile.imwrite(path, (base * 257).astype(np.uint16))
                paths.append(str(path))
                continue
            kind = "gray"
        path = folder / f"{i:04d}_{kind}.{ext}"
        if kind == "gray":
            img = Image.fromarray(base[..., 0].astype(np.uint8))
        elif kind == "gray16":
            img = Image.fromarray((base[..., 0] * 257).astype(np.uint16))  # I;16
        elif kind == "rgba":
            alpha = rng.integers(0, 256, (h, w, 1))
            img = Image.fromarray(np.concatenate([base, alpha], -1).astype(np.uint8))
            if fmt in ("JPEG", "BMP"):
                img = img.convert("RGB")
        else:
            img = Image.fromarray(base.astype(np.uint8))
        img.save(path, format=fmt)
        paths.append(str(path))
    return paths


def soak_backend(predictor: Predictor, pool: list[str], predictions: int, seed: int, warmup: float,
                 probe_every: int, progress: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    probe = pool[:4]
    first_probe = None
    probe_checks = probe_mismatches = 0
    per_image: dict[str, list[float]] = {}
    curve = {"images": [], "rss_mib": [], "latency_ms": [], "cpu_ms": [], "batch": []}
    load_start = os.getloadavg()
    done = calls = 0
    t_start = time.perf_counter()
    while done < predictions:
        b = int(min(rng.integers(1, 17), predictions - done))
        batch = [pool[i] for i in rng.integers(0, len(pool), b)]
        t0, c0 = time.perf_counter(), time.process_time()
        res = predictor.predict(batch)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        for path, s in zip(batch, res.scores):
            per_image.setdefault(path, []).append(float(s))
        done += b
        calls += 1
        curve["images"].append(done)
        curve["rss_mib"].append(round(rss_mib(), 2))
        curve["latency_ms"].append(round(dt * 1000, 3))
        curve["cpu_ms"].append(round(dc * 1000, 3))
        curve["batch"].append(b)
        if calls % probe_every == 1:
            got = predictor.predict(probe)
            if first_probe is None:
                first_probe = got
            else:
                probe_checks += 1
                same = (np.array_equal(got.scores, first_probe.scores)
                        and np.array_equal(got.anomaly_maps, first_probe.anomaly_maps)
                        and all(np.array_equal(a, c) for a, c in zip(got.masks, first_probe.masks)))
                probe_mismatches += not same
        if progress and calls % 100 == 0:
            print(f"  {predictor.backend}: {done}/{predictions} images, RSS {curve['rss_mib'][-1]:.0f} MiB, "
                  f"{time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    return summarize(curve, warmup) | {
        "backend": predictor.backend, "calls": calls, "predictions": done,
        "seconds": round(time.perf_counter() - t_start, 1),
        "loadavg_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
        "probe_checks": probe_checks, "probe_mismatches": probe_mismatches,
        "max_score_spread_across_batches": max((max(v) - min(v)) for v in per_image.values()),
        "curve": curve,
    }


def summarize(curve: dict, warmup: float) -> dict:
    n = len(curve["rss_mib"])
    start = min(n - 1, int(n * warmup))
    rss = np.asarray(curve["rss_mib"][start:])
    k = max(1, len(rss) // 10)
    rss_growth = float(np.median(rss[-k:]) / np.median(rss[:k]) - 1.0)
    per_image = np.asarray(curve["latency_ms"][start:]) / np.asarray(curve["batch"][start:])
    q = max(1, len(per_image) // 4)
    p99_first, p99_last = (float(np.percentile(per_image[:q], 99)), float(np.percentile(per_image[-q:], 99)))
    return {"warmup_calls": start, "rss_after_warmup_mib": float(np.median(rss[:k])),
            "rss_end_mib": float(np.median(rss[-k:])), "rss_growth": round(rss_growth, 4),
            "p50_ms_per_image": round(float(np.percentile(per_image, 50)), 3),
            "p99_ms_per_image_first_quarter": round(p99_first, 3),
            "p99_ms_per_image_last_quarter": round(p99_last, 3),
            "p99_drift": round(p99_last / p99_first, 3)} | _cpu_drift(curve, start)


def _cpu_drift(curve: dict, start: int) -> dict:
    if not curve.get("cpu_ms"):
        return {}
    per_image = np.asarray(curve["cpu_ms"][start:]) / np.asarray(curve["batch"][start:])
    q = max(1, len(per_image) // 4)
    first, last = float(np.percentile(per_image[:q], 99)), float(np.percentile(per_image[-q:], 99))
    return {"p99_cpu_ms_per_image_first_quarter": round(first, 3), "p99_cpu_ms_per_image_last_quarter": round(last, 3),
            "p99_cpu_drift": round(last / first, 3)}


def passed(r: dict, max_growth: float = 0.05, max_drift: float = 1.5) -> dict:
    return {"rss_growth_under_5pct": r["rss_growth"] < max_growth, "probe_bit_identical": r["probe_mismatches"] == 0,
            "p99_no_drift": r["p99_drift"] < max_drift}


def plot(results: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_lat) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for r in results:
        c = r["curve"]
        ax_rss.plot(c["images"], c["rss_mib"], label=r["backend"])
        per_image = np.asarray(c["latency_ms"]) / np.asarray(c["batch"])
        w = max(1, len(per_image) // 50)
        idx = list(range(w, len(per_image) + 1, w))
        ax_lat.plot([c["images"][i - 1] for i in idx], [np.percentile(per_image[i - w:i], 50) for i in idx],
                    label=f"{r['backend']} p50")
        ax_lat.plot([c["images"][i - 1] for i in idx], [np.percentile(per_image[i - w:i], 99) for i in idx],
                    "--", label=f"{r['backend']} p99")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.legend()
    ax_lat.set_ylabel("ms per image (rolling)")
    ax_lat.set_xlabel("predictions (images)")
    ax_lat.legend(fontsize=7, ncol=3)
    fig.suptitle("fastad soak: one Predictor per backend, mixed files and batches 1-16")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def run_soak(run: str, backends: list[str], predictions: int, *, onnx: str | None = None, pool_size: int = 40,
             seed: int = 0, warmup: float = 0.1, probe_every: int = 50, device: str = "cpu",
             progress: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="fastad-soak-") as tmp:
        pool = make_image_pool(Path(tmp) / "images", pool_size, seed)
        results = []
        for backend in backends:
            path = run
            if backend == "onnx":
                if onnx is None:
                    from fastad.export import export_onnx

                    onnx = str(Path(tmp) / "model.onnx")
                    export_onnx(run, onnx, check=False)
                path = onnx
            predictor = Predictor(path, backend=backend, device=device)
            r = soak_backend(predictor, pool, predictions, seed, warmup, probe_every, progress)
            r["passed"] = passed(r)
            results.append(r)
            del predictor
            gc.collect()
    return {"run": str(run), "predictions_per_backend": predictions, "pool_size": pool_size, "seed": seed,
            "device": device_name(device) if device != "cpu" else "cpu", "versions": library_versions(),
            "omp_threads": os.environ.get("OMP_NUM_THREADS"), "results": results}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory")
    ap.add_argument("--backend", default="torch,torch-lean,onnx")
    ap.add_argument("--predictions", type=int, default=10_000, help="images per backend")
    ap.add_argument("--onnx", help="use this .onnx (default: export the run to a temp file)")
    ap.add_argument("--pool", type=int, default=40, help="distinct image files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of calls before the RSS baseline")
    ap.add_argument("--probe-every", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    result = run_soak(args.run, [b.strip() for b in args.backend.split(",") if b.strip()], args.predictions,
                      onnx=args.onnx, pool_size=args.pool, seed=args.seed, warmup=args.warmup,
                      probe_every=args.probe_every, device=args.device)
    result["command"] = "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in result["results"]:
        print(f"{r['backend']:10s} {r['predictions']} images in {r['seconds']} s: RSS {r['rss_after_warmup_mib']:.0f} "
              f"-> {r['rss_end_mib']:.0f} MiB ({100 * r['rss_growth']:+.2f} %), p99 drift {r['p99_drift']:.2f} "
              f"(CPU time {r.get('p99_cpu_drift', float('nan')):.2f}, load {r['loadavg_1min_start_end']}), "
              f"probe {r['probe_checks'] - r['probe_mismatches']}/{r['probe_checks']} identical, "
              f"score spread across batches {r['max_score_spread_across_batches']:.2e}, passed {r['passed']}")
    if args.json:
        write_json(args.json, result)
    if args.png:
        plot(result["results"], args.png)
    return 0 if all(all(r["passed"].values()) for r in result["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
