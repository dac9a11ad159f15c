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

onnx / openvino / tensorrt need files: `--onnx FILES` / `--openvino FILES` / `--engine FILE`, or
they are exported from the run into a temporary directory first (TensorRT: needs TensorRT).

CPU lines (issue 19):

    fastad bench --run runs/bottle --backend torch,onnx,onnx:int8,openvino,openvino:bf16,openvino:int8 \
                 --batch 8 --matmul-size 2048 --data DIR --test-set [--threads N] [--calibration DIR]

A backend is named at a precision, "backend[:precision]" (fastad.backends.BENCH_PRECISIONS); a
file is picked from the given ones by its sidecar's precision. Each record also carries the
model's FLOPs per image (torch's FLOP counter on the run's model, the same for every backend),
the GFLOP/s that makes at the measured images/s and, with `--matmul-size N`, its fraction of the
machine's N×N matrix-product rate measured in the same run (torch, fp32 and bf16, one product
per dtype per round among the backends): fp32 backends against the fp32 rate, reduced precision
against the bf16 rate. `--test-set` scores --data's whole test set with every backend: image
AUROC and max |Δ map| / map range against the fp32 torch reference.

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

from .backends import BACKENDS, BENCH_PRECISIONS, RUN_BACKENDS
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


FILE_SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "tensorrt": ".engine"}


def parse_backend(spec: str) -> tuple[str, str]:
    """"onnx:int8" -> ("onnx", "int8"); "torch" -> ("torch", "fp32") (fastad.backends.BENCH_PRECISIONS)."""
    backend, _, precision = spec.strip().partition(":")
    if backend not in BACKENDS:
        raise FastADError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)} (optionally :precision)")
    allowed = BENCH_PRECISIONS[backend]
    precision = precision or allowed[0]
    if precision not in allowed:
        raise FastADError(f"backend {backend} runs at {', '.join(allowed)}, not {precision!r}")
    return backend, precision


def backend_label(backend: str, precision: str) -> str:
    return backend if precision == "fp32" else f"{backend}:{precision}"


def _file_for(backend: str, precision: str, run_dir: str, files: dict, tmp: Path, batches: list[int],
              calibration: str | None) -> Path:
    """The exported file a (file backend, precision) runs: one of the given files whose sidecar has
    that precision, else exported from the run into `tmp`. OpenVINO's bf16 is a runtime hint: bf16
    runs the fp32 IR, int8+bf16 the int8 IR."""
    from .sidecar import read_sidecar

    wanted = {"bf16": "fp32", "int8+bf16": "int8"}.get(precision, precision) if backend == "openvino" else precision
    for path in files.get(backend) or []:
        if read_sidecar(path).get("precision") == wanted:
            return Path(path)
    path = tmp / f"{backend}-{wanted}{FILE_SUFFIX[backend]}"
    if path.exists():
        return path
    if backend == "onnx":
        from .export.onnx import export_onnx

        export_onnx(run_dir, path, fp16=wanted == "fp16", int8=wanted == "int8", calibration=calibration, check=False)
    elif backend == "openvino":
        from .export.openvino import export_openvino

        export_openvino(run_dir, path, int8=wanted == "int8", calibration=calibration)
    else:
        from .export.tensorrt import export_engine

        export_engine(run_dir, path, fp16=wanted == "fp16", max_batch=max(batches), opt_batch=max(batches))
    return path


def _open(spec: tuple[str, str], run_dir: str, device: str, files: dict, tmp: Path, batches: list[int],
          calibration: str | None = None, threads: int | None = None) -> Predictor:
    backend, precision = spec
    if backend in RUN_BACKENDS:
        return Predictor(run_dir, backend=backend, device=device, batch_size=max(batches), precision=precision,
                         threads=threads)
    path = _file_for(backend, precision, run_dir, files, tmp, batches, calibration)
    hint = "bf16" if backend == "openvino" and precision.endswith("bf16") else "fp32"
    return Predictor(path, backend=backend, device=device, batch_size=max(batches), precision=hint,
                     threads=threads)


def flops_per_image(predictor: Predictor) -> float:
    """Floating-point operations of one image through a run directory's torch model, by torch's
    FLOP counter (a multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    engine = predictor.engine
    x = torch.zeros((1, 3, predictor.crop, predictor.crop), device=engine.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        engine.graph(x)
    return float(counter.get_total_flops())


class MatmulRate:
    """The machine's matrix-product rate: one size×size torch product per call, in fp32 and bf16,
    timed among the backends (the same noise hits both); -> GFLOP/s from the median call."""

    DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def __init__(self, size: int, device: str):
        gen = torch.Generator().manual_seed(0)
        self.size = size
        self.operands = {k: [torch.rand(size, size, generator=gen).to(device, dt) for _ in range(2)]
                         for k, dt in self.DTYPES.items()}
        self.times = {k: [] for k in self.DTYPES}
        self.gpu = device.startswith("cuda")
        for k in self.DTYPES:
            self.call(k, record=False)  # warm-up

    def call(self, kind: str, record: bool = True) -> None:
        a, b = self.operands[kind]
        t0 = time.perf_counter()
        torch.mm(a, b)
        if self.gpu:
            torch.cuda.synchronize()
        if record:
            self.times[kind].append(time.perf_counter() - t0)

    def gflops(self) -> dict:
        return {k: 2 * self.size ** 3 / float(np.median(t)) / 1e9 for k, t in self.times.items()}


def _test_set(data: str, resize: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """A dataset's whole test split: (images (n, 3, S, S) float32, labels (n,) 0 normal / 1 anomalous)."""
    from .data.layouts import list_samples

    samples = list_samples(data, split="test")
    return prepare_images([str(s.path) for s in samples], resize, crop).numpy(), np.array([s.label for s in samples])


def _test_set_scores(predictors: dict, reference: Predictor, data: str) -> dict:
    """Image AUROC on the test set per backend, and its max |Δ map| / map range against the fp32
    torch reference over the whole set."""
    from .metrics import image_auroc

    images, labels = _test_set(data, reference.resize, reference.crop)
    ref_maps, ref_scores = reference.scores_and_maps(images)
    map_range = float(ref_maps.max() - ref_maps.min()) or 1.0
    out = {}
    for label, p in predictors.items():
        maps, scores = (ref_maps, ref_scores) if p is reference else p.scores_and_maps(images)
        out[label] = {"test_images": int(len(labels)), "test_auroc": image_auroc(labels, scores),
                      "test_max_rel_diff_map": float(np.abs(maps - ref_maps).max()) / map_range}
    return out


def run_bench(run_dir: str, backends: list[str], batches: list[int], *, device: str = "auto",
              data: str | None = None, rounds: int | None = None, max_seconds: float = 60.0,
              onnx: str | list[str] | None = None, engine: str | None = None,
              openvino: str | list[str] | None = None, calibration: str | None = None,
              threads: int | None = None, matmul_size: int | None = None, test_set: bool = False,
              command: str | None = None) -> dict:
    """Measure; -> the JSON-ready result dict (see module docstring). `backends`: "backend[:precision]"
    names; `onnx` / `openvino`: exported files to use (each picked by its sidecar's precision)."""
    specs = {}
    for name in backends:
        spec = parse_backend(name)
        specs[backend_label(*spec)] = spec
    if not batches or min(batches) < 1:
        raise FastADError(f"batch sizes must be >= 1, got {batches}")
    if test_set and data is None:
        raise FastADError("--test-set needs --data (a dataset with a test split)")
    if matmul_size is not None and matmul_size < 1:
        raise FastADError(f"--matmul-size must be >= 1, got {matmul_size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device.startswith("cuda")
    files = {"onnx": _paths(onnx), "openvino": _paths(openvino), "tensorrt": _paths(engine)}
    with tempfile.TemporaryDirectory(prefix="fastad-bench-") as tmp:
        reference = _open(("torch", "fp32"), run_dir, device, {}, Path(tmp), batches, threads=threads)
        predictors = {label: (reference if spec == ("torch", "fp32") else
                              _open(spec, run_dir, device, files, Path(tmp), batches, calibration, threads))
                      for label, spec in specs.items()}
        flops = flops_per_image(reference)
        rate = MatmulRate(matmul_size, device) if matmul_size else None
        records = []
        for batch in batches:
            x = _inputs(data, reference.crop, reference.resize, batch)
            ref_maps, ref_scores = reference.scores_and_maps(x)  # also a warm-up at this shape
            times = {b: [] for b in predictors}
            parity = {}
            for b, p in predictors.items():
                maps, scores = p.scores_and_maps(x)  # warm-up at this shape + parity
                parity[b] = (float(np.abs(maps - ref_maps).max()), float(np.abs(scores - ref_scores).max()))
            # Round-robin timing: one call per backend (and per matrix-product dtype) per round,
            # until `rounds` or the time budget.
            start = time.perf_counter()
            n = 0
            while True:
                for b, p in predictors.items():
                    t0 = time.perf_counter()
                    p.scores_and_maps(x)
                    times[b].append(time.perf_counter() - t0)
                for kind in (MatmulRate.DTYPES if rate else ()):
                    rate.call(kind)
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
                img_s = float(batch / np.median(ms) * 1e3)
                precision = specs[b][1]
                ref_kind = "fp32" if precision == "fp32" else "bf16"  # reduced precision: the faster limit
                records.append({
                    "backend": b, "precision": precision, "batch": batch, "device": str(p.engine.device),
                    "iterations": len(ms),
                    "latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                                   "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())},
                    "throughput_img_s": img_s,
                    "flops_per_image": flops,
                    "gflops": flops * img_s / 1e9,
                    "matmul_rate_ref": ref_kind if rate else None,
                    "fraction_of_matmul_rate": flops * img_s / 1e9 / rate.gflops()[ref_kind] if rate else None,
                    "peak_mem_mb": round(mem.delta_mb, 1),
                    "peak_mem_total_mb": round(mem.peak, 1),
                    "peak_mem_kind": ("GPU device memory in use" if gpu else "process RSS") +
                                     " during one call: above the level before it (peak_mem_mb) and in total "
                                     "(peak_mem_total_mb, includes every loaded backend)",
                    "max_abs_diff_map": parity[b][0], "max_abs_diff_score": parity[b][1],
                    "max_rel_diff_map": parity[b][0] / map_range,
                    "speedup_vs_torch": float(np.median(times["torch"]) / np.median(times[b])) if "torch" in times else None,
                })
        if test_set:
            quality = _test_set_scores(predictors, reference, data)
            for r in records:
                r.update(quality[r["backend"]])
    return {"device": device_name(device), "versions": library_versions(),
            "command": command or " ".join(sys.argv), "run": str(run_dir),
            "inputs": f"test images of {data}" if data else "seeded uniform noise in [0, 1]",
            "threads": threads or torch.get_num_threads(), "flops_per_image": flops,
            "matmul": ({"size": matmul_size, "threads": torch.get_num_threads(),
                        **{f"{k}_gflops": v for k, v in rate.gflops().items()}} if rate else None),
            "records": records}


def _paths(value) -> list:
    """None, one path or a list of paths -> a list."""
    return [value] if isinstance(value, (str, os.PathLike)) else list(value or [])


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

    def num(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [f"Device: {result['device']}  ", f"Command: `{result['command']}`  "]
    if result.get("flops_per_image"):
        lines.append(f"Model: {result['flops_per_image'] / 1e9:.2f} GFLOP per image (torch's FLOP counter)  ")
    mm = result.get("matmul")
    if mm:
        lines.append(f"Matrix-product rate ({mm['size']}², {mm['threads']} threads, timed among the backends): "
                     f"fp32 {mm['fp32_gflops']:.1f} GFLOP/s, bf16 {mm['bf16_gflops']:.1f} GFLOP/s  ")
    lines += ["",
              "| backend | batch | p50 ms | p90 ms | p99 ms | img/s | × torch | GFLOP/s | × matmul rate | peak mem MB | "
              "max Δ map | Δ map / range | max Δ score | AUROC |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["records"]:
        lat = r["latency_ms"]
        frac = r.get("fraction_of_matmul_rate")
        frac_text = "–" if frac is None else f"{frac:.2f} ({r['matmul_rate_ref']})"
        lines.append(f"| {r['backend']} | {r['batch']} | {lat['p50']:.1f} | {lat['p90']:.1f} | {lat['p99']:.1f} | "
                     f"{r['throughput_img_s']:.2f} | {num(r.get('speedup_vs_torch'), '.2f')} | "
                     f"{num(r.get('gflops'), '.1f')} | "
                     f"{frac_text} | "
                     f"{r['peak_mem_mb']:.0f} | {r['max_abs_diff_map']:.2e} | {num(r.get('max_rel_diff_map'), '.2e')} | "
                     f"{r['max_abs_diff_score']:.2e} | {num(r.get('test_auroc'), '.4f')} |")
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
