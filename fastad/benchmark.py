"""`fastad bench`: end-to-end runtime benchmark, every backend, every batch size, parity against torch.

    fastad bench --run runs/bottle --backend torch,onnx[,triton,tensorrt] --batch 1,8,32 \
                 --json bench.json [--md bench.md] [--png bench.png] [--data DIR]

For each (backend, batch): latency p50/p90/p99 of `Predictor.scores_and_maps` on a ready float32
batch (the model call: preprocessing excluded, the same for every backend), images/s, peak memory
during one call (CPU: process RSS; GPU: device memory in use), above the level before the call
and in total — onnxruntime reuses its arena after the warm-up, so its increase is often ~0 — and
the max |Δ| of maps and scores against the torch reference on the same inputs. Backends are
measured round-robin, one call each per round, so that the noise of a shared machine hits them
alike: compare ratios within one run; absolute times only from a GPU.

onnx / tensorrt need files: `--onnx FILE` / `--engine FILE`, or they are exported from the run
into a temporary directory first (TensorRT: needs TensorRT).

Against a Triton server (`fastad serve`):

    fastad bench --server http://127.0.0.1:8000 [--run REPO/NAME/1/model.onnx] --concurrency 1,4,16

times whole predictions the way line software makes them: C client threads, each sending one
encoded image per request (`fastad.Client.predict`), latency per request and images/s over all
threads, for each concurrency C — and beside it, with `--run`, the same threads sharing one
in-process `fastad.Predictor` on the same image files (decoding included on both sides). Give
the repository's own network file as `--run` to compare the same engine.
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from .backends import BACKENDS, RUN_BACKENDS
from .errors import FastADError
from .preprocess import prepare_images
from .runtime import Predictor
from .utils import atomic_path, library_versions, write_json


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"


class MemorySampler:
    """Peak memory above the starting level while the block runs (sampled every 2 ms)."""

    def __init__(self, gpu: bool):
        self.gpu = gpu and torch.cuda.is_available()
        self.peak = 0.0
        self._stop = threading.Event()

    def _now_mb(self) -> float:
        if self.gpu:
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2 ** 20
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now_mb())
            time.sleep(0.002)

    def __enter__(self):
        self.base = self.peak = self._now_mb()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now_mb())

    @property
    def delta_mb(self) -> float:
        return max(0.0, self.peak - self.base)


def _inputs(data: str | None, crop: int, resize: int, n: int, seed: int = 0) -> np.ndarray:
    """n images: real ones from a dataset's test split (cycled), else seeded uniform noise."""
    if data is None:
        return np.random.default_rng(seed).random((n, 3, crop, crop), dtype=np.float32)
    from .data.layouts import list_samples

    paths = [s.path for s in list_samples(data, split="test")][:n]
    batch = prepare_images([str(p) for p in paths], resize, crop).numpy()
    return np.concatenate([batch] * (n // len(batch) + 1))[:n]


def _open(backend: str, run_dir: str, device: str, files: dict, tmp: Path, batches: list[int]):
    if backend in RUN_BACKENDS:
        return Predictor(run_dir, backend=backend, device=device, batch_size=max(batches))
    if backend == "onnx":
        path = files.get("onnx")
        if path is None:
            from .export.onnx import export_onnx

            path = tmp / "model.onnx"
            export_onnx(run_dir, path, check=False)
        return Predictor(path, backend="onnx", device=device, batch_size=max(batches))
    if backend == "tensorrt":
        path = files.get("engine")
        if path is None:
            from .export.tensorrt import export_engine

            path = tmp / "model.engine"
            export_engine(run_dir, path, max_batch=max(batches), opt_batch=max(batches))
        return Predictor(path, backend="tensorrt", device=device, batch_size=max(batches))
    raise FastADError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")


def run_bench(run_dir: str, backends: list[str], batches: list[int], *, device: str = "auto",
              data: str | None = None, rounds: int | None = None, max_seconds: float = 60.0,
              onnx: str | None = None, engine: str | None = None, command: str | None = None) -> dict:
    """Measure; -> the JSON-ready result dict (see module docstring)."""
    for b in backends:
        if b not in BACKENDS:
            raise FastADError(f"unknown backend {b!r}: use {', '.join(BACKENDS)}")
    if not batches or min(batches) < 1:
        raise FastADError(f"batch sizes must be >= 1, got {batches}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="fastad-bench-") as tmp:
        reference = _open("torch", run_dir, device, {}, Path(tmp), batches)
        predictors = {b: (reference if b == "torch" else
                          _open(b, run_dir, device, {"onnx": onnx, "engine": engine}, Path(tmp), batches))
                      for b in backends}
        records = []
        for batch in batches:
            x = _inputs(data, reference.crop, reference.resize, batch)
            ref_maps, ref_scores = reference.scores_and_maps(x)  # also a warm-up at this shape
            times = {b: [] for b in backends}
            parity = {}
            for b, p in predictors.items():
                maps, scores = p.scores_and_maps(x)  # warm-up at this shape + parity
                parity[b] = (float(np.abs(maps - ref_maps).max()), float(np.abs(scores - ref_scores).max()))
            # Round-robin timing: one call per backend per round, until `rounds` or the time budget.
            start = time.perf_counter()
            n = 0
            while True:
                for b, p in predictors.items():
                    t0 = time.perf_counter()
                    p.scores_and_maps(x)
                    times[b].append(time.perf_counter() - t0)
                n += 1
                spent = time.perf_counter() - start
                if (rounds is not None and n >= rounds) or (rounds is None and n >= 3 and spent > max_seconds) \
                        or (rounds is None and n >= 50):
                    break
            map_range = float(ref_maps.max() - ref_maps.min()) or 1.0
            for b, p in predictors.items():
                with MemorySampler(gpu) as mem:
                    p.scores_and_maps(x)
                ms = np.array(times[b]) * 1e3
                records.append({
                    "backend": b, "batch": batch, "device": str(p.engine.device), "iterations": len(ms),
                    "latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                                   "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())},
                    "throughput_img_s": float(batch / np.median(ms) * 1e3),
                    "peak_mem_mb": round(mem.delta_mb, 1),
                    "peak_mem_total_mb": round(mem.peak, 1),
                    "peak_mem_kind": ("GPU device memory in use" if gpu else "process RSS") +
                                     " during one call: above the level before it (peak_mem_mb) and in total "
                                     "(peak_mem_total_mb, includes every loaded backend)",
                    "max_abs_diff_map": parity[b][0], "max_abs_diff_score": parity[b][1],
                    "max_rel_diff_map": parity[b][0] / map_range,
                    "speedup_vs_torch": float(np.median(times["torch"]) / np.median(times[b])) if "torch" in times else None,
                })
    return {"device": device_name(device), "versions": library_versions(),
            "command": command or " ".join(sys.argv), "run": str(run_dir),
            "inputs": f"test images of {data}" if data else "seeded uniform noise in [0, 1]",
            "records": records}


def _encoded_inputs(data: str | None, size: int, n: int, seed: int = 0) -> list[bytes]:
    """n image files: a dataset's test images as stored (cycled), else seeded noise as PNG."""
    import io

    from PIL import Image

    if data is not None:
        from .data.layouts import list_samples

        files = [Path(s.path).read_bytes() for s in list_samples(data, split="test")][:n]
        return (files * (n // len(files) + 1))[:n]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _timed_threads(predict_one, images: list[bytes], concurrency: int, per_thread: int | None,
                   max_seconds: float) -> tuple[list[float], float]:
    """`concurrency` threads each calling predict_one(image) in turn -> (latencies s, wall s)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def worker(k: int) -> None:
        n = 0
        while True:
            if per_thread is not None and n >= per_thread:
                return
            if per_thread is None and n >= 3 and time.perf_counter() - start > max_seconds:
                return
            t0 = time.perf_counter()
            try:
                predict_one(images[(k + n * concurrency) % len(images)])
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                return
            with lock:
                latencies.append(time.perf_counter() - t0)
            n += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return latencies, time.perf_counter() - start


def run_server_bench(server: str, concurrency: list[int], *, run: str | None = None, data: str | None = None,
                     per_thread: int | None = None, max_seconds: float = 60.0, device: str = "auto",
                     model: str | None = None, command: str | None = None) -> dict:
    """Measure a Triton server (fastad.Client) and, with `run`, an in-process Predictor at each
    concurrency; -> the JSON-ready result dict (records keyed by "concurrency")."""
    from .client import Client
    from .preprocess import decode_image

    if not concurrency or min(concurrency) < 1:
        raise FastADError(f"concurrency levels must be >= 1, got {concurrency}")
    client = Client(server, model)
    backends = {f"server ({client.protocol})": client.predict}
    local = None
    if run is not None:
        local = Predictor(run, device=device, batch_size=1)
        backends[f"in-process ({local.backend})"] = lambda data_: local.predict(decode_image(data_))
    images = _encoded_inputs(data, client.image_size or 256, 64)
    records = []
    for c in concurrency:
        for name, predict_one in backends.items():
            predict_one(images[0])  # warm-up (a new connection for the client)
            lat, wall = _timed_threads(predict_one, images, c, per_thread, max_seconds)
            ms = np.array(lat) * 1e3
            records.append({
                "backend": name, "concurrency": c, "batch": 1, "iterations": len(ms),
                "device": str(local.engine.device) if name.startswith("in-process") else f"server {server}",
                "latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                               "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())},
                "throughput_img_s": float(len(ms) / wall),
            })
    stats = client.statistics()
    return {"device": device_name("cpu" if local is None else str(local.engine.device)), "versions": library_versions(),
            "command": command or " ".join(sys.argv), "run": run, "server": server, "model": client.model,
            "x": "concurrency",
            "inputs": f"test images of {data}" if data else "seeded uniform noise, PNG",
            "server_statistics": stats, "records": records}


def markdown_table(result: dict) -> str:
    if result.get("x") == "concurrency":
        lines = [f"Device: {result['device']}  ", f"Command: `{result['command']}`", "",
                 "| backend | concurrency | requests | p50 ms | p90 ms | p99 ms | img/s |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for r in result["records"]:
            lat = r["latency_ms"]
            lines.append(f"| {r['backend']} | {r['concurrency']} | {r['iterations']} | {lat['p50']:.1f} | "
                         f"{lat['p90']:.1f} | {lat['p99']:.1f} | {r['throughput_img_s']:.2f} |")
        batches = result.get("server_statistics", {}).get("batches")
        if batches:
            lines += ["", "Server executions by batch size: " +
                      ", ".join(f"{size}: {n}" for size, n in sorted(batches.items()))]
        return "\n".join(lines) + "\n"

    lines = [f"Device: {result['device']}  ", f"Command: `{result['command']}`", "",
             "| backend | batch | p50 ms | p90 ms | p99 ms | img/s | × torch | peak mem MB | max Δ map | max Δ score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["records"]:
        lat = r["latency_ms"]
        speed = f"{r['speedup_vs_torch']:.2f}" if r.get("speedup_vs_torch") else "–"
        lines.append(f"| {r['backend']} | {r['batch']} | {lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} | "
                     f"{r['throughput_img_s']:.2f} | {speed} | {r['peak_mem_mb']:.0f} | "
                     f"{r['max_abs_diff_map']:.2e} | {r['max_abs_diff_score']:.2e} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = result.get("x", "batch")
    backends = list(dict.fromkeys(r["backend"] for r in result["records"]))
    for b in backends:
        rs = [r for r in result["records"] if r["backend"] == b]
        xs = [r[x] for r in rs]
        ax1.plot(xs, [r["throughput_img_s"] for r in rs], marker="o", label=b)
        ax2.plot(xs, [r["latency_ms"]["p50"] for r in rs], marker="o", label=f"{b} p50")
        if x == "concurrency":
            ax2.plot(xs, [r["latency_ms"]["p99"] for r in rs], marker="x", linestyle="--", label=f"{b} p99")
    for ax, title in ((ax1, "throughput (images/s)"), (ax2, "latency (ms)" if x == "concurrency" else "latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(result["device"][:90], fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_outputs(result: dict, json_path=None, md_path=None, png_path=None) -> None:
    if json_path:
        write_json(json_path, result)
    if md_path:
        with atomic_path(md_path) as tmp:
            tmp.write_text(markdown_table(result))
    if png_path:
        plot(result, png_path)
