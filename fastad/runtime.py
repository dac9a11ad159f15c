"""The one way into inference: a run directory, an .onnx, an OpenVINO .xml or a TensorRT .engine, one call.

    import fastad
    p = fastad.load("runs/bottle")                  # = fastad.Predictor(...); backend="auto"
    p = fastad.load("bottle.onnx")                  # onnxruntime, CPU or CUDA (device="cuda")
    p = fastad.load("bottle.engine")                # TensorRT
    p = fastad.load("bottle.xml", precision="bf16", threads=2)  # OpenVINO IR on the CPU
    p.calibrate(["good/000.png", ...])              # threshold from normal validation images
    res = p.predict(["a.png", frame_uint8_hwc, ...])  # any sizes, uint8 or float in [0, 1]
    res.scores, res.is_anomalous                    # (B,) image scores and decisions
    res.anomaly_maps                                # (B, S, S) maps at the model's resolution
    res.masks[i], res.regions[i]                    # per image, in that image's own pixel grid
    p.model                                         # the torch model of a run directory (else None)

backend "auto" means the same everywhere (`fastad eval`, `fastad predict`, Python): a run
directory runs with "triton" (fused kernels) on CUDA, else "torch" (the reference ops); an
exported file runs with its own engine. Names: fastad.backends.

Read top-down: engines (torch / onnxruntime / TensorRT, each `run(float32 batch) -> (maps,
scores)`) → `Predictor`. Preprocessing (any input → float batch, and the crop geometry) is
fastad.preprocess; post-processing (map back to the input's pixels, threshold, regions) and the
default thresholds are fastad.postprocess.

Thread safety: one Predictor may be shared by several threads. Engine calls are serialised per
instance (a TensorRT execution context and its buffers are single-stream); preprocessing and
post-processing (the C++ module releases the GIL) run concurrently; `calibrate` swaps both
thresholds at once, and a prediction uses one consistent pair. Predictors may be created from
several threads at once.

Out of memory: a batch the device cannot hold is split in halves (down to one image) and the
predictor keeps the smaller engine batch (`batch_size`) from then on, with a warning; one image
that does not fit is a FastADError saying so.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np
import torch

from . import postprocess
from .backends import BACKENDS, PRECISIONS, RUN_BACKENDS
from .errors import FastADError
from .postprocess import Region, default_thresholds
from .preprocess import prepare_batch
from .results import Result  # noqa: F401 - part of this module's interface
from .sidecar import read_artifact, read_sidecar, sidecar_path
from .utils import confined_file, read_verified

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
log = logging.getLogger(__name__)

# How engines say they ran out of memory: torch (CUDA, CPU allocator), onnxruntime (its arena),
# TensorRT through torch allocations.
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "failed to allocate memory", "cudaerrormemoryallocation")


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return any(m in text for m in _OOM_MESSAGES)


# --------------------------------------------------------------------------------------------
# Engines: float32 (B, 3, S, S) numpy in [0, 1] -> (maps (B, S, S), scores (B,)) numpy float32
# --------------------------------------------------------------------------------------------
DTYPE_OF_PRECISION = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchEngine:
    """A run directory through PyTorch with one implementation of the hot ops (fastad.backends):
    reference ops ("torch"), memory-lean blocked torch ("torch-lean") or fused Triton ("triton",
    CUDA, or CPU under TRITON_INTERPRET=1 for tests), at a `precision` (fastad.backends.PRECISIONS):
    the model's weights and activations in that dtype, float32 images in and maps out, the
    correlation statistics in fp32 — the same graph as the ONNX export's."""

    max_batch = None

    def __init__(self, run_dir, backend: str = "torch", device: str = "auto", precision: str = "fp32",
                 threads: int | None = None):
        from .export.onnx import InferenceGraph
        from .run import load_model

        if threads:
            torch.set_num_threads(int(threads))  # torch has one thread pool per process

        model, conf = load_model(run_dir, device, backend)
        self.graph = InferenceGraph(model, DTYPE_OF_PRECISION[precision])  # casts the model
        self.model, self.name, self.precision = model, backend, precision
        self.device = next(model.parameters()).device
        cfg = model.cfg
        self.meta = {"model": conf["model"], "resize": cfg.resize, "crop": cfg.crop,
                     "thresholds": default_thresholds(conf), "source": str(run_dir), "precision": precision}

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.graph(torch.from_numpy(batch).to(self.device))
        return amap.cpu().numpy(), score.cpu().numpy()


def _meta_from_sidecar(path: Path) -> dict:
    side = read_sidecar(path)
    return {"model": side.get("model"), "resize": side["input"]["resize"], "crop": side["input"]["crop"],
            "thresholds": side.get("thresholds") or {"image": None, "pixel": None}, "source": str(path),
            "precision": side.get("precision"), "sidecar": side}


class OnnxEngine:
    """An exported .onnx through onnxruntime: CPUExecutionProvider, or CUDA with device="cuda"."""

    max_batch = None
    model = None

    def __init__(self, path, device: str = "auto", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FastADError("onnxruntime is not installed: pip install onnxruntime "
                              "(or onnxruntime-gpu for CUDA)") from None
        path = Path(path)
        self.meta = _meta_from_sidecar(path)
        available = ort.get_available_providers()
        want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        if want_cuda and "CUDAExecutionProvider" not in available:
            raise FastADError(f"device {device}: this onnxruntime has no CUDAExecutionProvider "
                              "(install onnxruntime-gpu, or use --device cpu)")
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: fp16 graphs make the optimiser chatty
        if threads:
            opts.intra_op_num_threads = threads
        model_bytes = read_artifact(path, self.meta["sidecar"])
        try:
            self.session = ort.InferenceSession(model_bytes, opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise FastADError(f"cannot load {path} with onnxruntime: {str(e).splitlines()[0]}") from None
        self.name = "onnx"
        self.device = "cuda" if want_cuda else "cpu"
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.session.run(["anomaly_map", "score"], {self.input_name: batch})
        return amap.astype(np.float32, copy=False), score.astype(np.float32, copy=False)


class TensorRTEngine:
    """A serialized TensorRT engine (built by `fastad export --format engine`), run with the
    TensorRT Python API on torch-allocated CUDA buffers (no pycuda needed). Batch sizes up to the
    engine's optimisation-profile maximum. Written against TensorRT 10/11; not run on these
    machines (no TensorRT here)."""

    model = None

    def __init__(self, path, device: str = "auto"):
        from fastad.export.tensorrt import import_tensorrt

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise FastADError("TensorRT engines need a CUDA GPU; none is available")
        path = Path(path)
        self.meta = _meta_from_sidecar(path)
        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(read_artifact(path, self.meta["sidecar"]))
        if self.engine is None:
            raise FastADError(f"{path}: TensorRT could not deserialize it (built with another TensorRT "
                              "version or GPU? engines are not portable)")
        self.context = self.engine.create_execution_context()
        _, _, max_shape = self.engine.get_tensor_profile_shape("images", 0)  # min, opt, max
        self.max_batch = int(max_shape[0])
        self.stream = torch.cuda.Stream(device=self.device)
        self.name = "tensorrt"

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, _, s, _ = batch.shape
        images = torch.from_numpy(batch).to(self.device)
        amap = torch.empty((b, s, s), dtype=torch.float32, device=self.device)
        score = torch.empty((b,), dtype=torch.float32, device=self.device)
        self.context.set_input_shape("images", tuple(images.shape))
        for name, t in (("images", images), ("anomaly_map", amap), ("score", score)):
            self.context.set_tensor_address(name, t.data_ptr())
        with torch.cuda.stream(self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise FastADError("TensorRT execution failed (see the TensorRT log above)")
        self.stream.synchronize()
        return amap.cpu().numpy(), score.cpu().numpy()


def read_openvino_ir(path: Path, side: dict) -> tuple[bytes, bytes]:
    """An IR's graph (.xml) and weights (.bin) as bytes, each checked against the sha256 its
    sidecar records; OpenVINO compiles these bytes, so what is checked is what runs."""
    info = side.get("openvino")
    if not isinstance(info, dict):
        raise FastADError(f"{sidecar_path(path)}: not the sidecar of an OpenVINO IR (no 'openvino' entry)")
    what = str(sidecar_path(path))
    weights = confined_file(path.parent, info.get("weights", path.with_suffix(".bin").name), what)
    return read_artifact(path, side), read_verified(weights, info.get("weights_sha256"), what)


class OpenVINOEngine:
    """An exported OpenVINO IR (.xml + .bin) on the CPU. `precision` is OpenVINO's
    INFERENCE_PRECISION_HINT: fp32, or bf16 on CPUs with AVX512-BF16/AMX (an int8 file keeps its
    quantised products and runs the rest at that precision)."""

    max_batch = None
    model = None
    HINTS = {"fp32": "f32", "bf16": "bf16"}

    def __init__(self, path, device: str = "auto", precision: str = "fp32", threads: int | None = None):
        try:
            import openvino as ov
        except ImportError:
            raise FastADError("OpenVINO is not installed: pip install openvino") from None
        if device not in ("auto", "cpu"):
            raise FastADError(f"device {device}: fastad runs OpenVINO IR on the CPU (use --device cpu)")
        if precision not in self.HINTS:
            raise FastADError(f"precision {precision}: OpenVINO runs at {' or '.join(self.HINTS)} on the CPU")
        path = Path(path)
        self.meta = _meta_from_sidecar(path)
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise FastADError("precision bf16: this CPU has no bf16 support (AVX512-BF16 or AMX); use fp32")
        config = {"INFERENCE_PRECISION_HINT": self.HINTS[precision]}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        xml, weights = read_openvino_ir(path, self.meta["sidecar"])
        try:
            self.compiled = core.compile_model(core.read_model(xml, weights), "CPU", config)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
            raise FastADError(f"cannot load {path} with OpenVINO: {str(e).strip().splitlines()[0]}") from None
        self.name, self.device, self.precision = "openvino", "cpu", precision
        self.meta["precision"] = f"{self.meta.get('precision')}+{precision}" if self.meta.get("precision") == "int8" else precision
        self._request = self.compiled.create_infer_request()

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        res = self._request.infer({0: batch})
        amap, score = res[self.compiled.output("anomaly_map")], res[self.compiled.output("score")]
        return np.asarray(amap, np.float32).copy(), np.asarray(score, np.float32).copy()


def open_engine(path, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                threads: int | None = None):
    """Pick the engine for `path`: a run directory (torch backends, at `precision`), .onnx, or
    .engine/.plan (their precision is the file's). `threads`: CPU threads of the engine (torch:
    of the whole process)."""
    if threads is not None and int(threads) < 1:
        raise FastADError(f"threads must be >= 1, got {threads}")
    path = Path(path)
    if backend not in ("auto",) + BACKENDS:
        raise FastADError(f"unknown backend {backend!r}: use auto, {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise FastADError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if not path.exists():
        raise FastADError(f"{path} does not exist")
    if not path.is_dir() and path.suffix != ".xml" and precision != "fp32":
        raise FastADError(f"{path}: precision {precision} applies to run directories and OpenVINO IR; an "
                          "exported .onnx / engine runs at the precision it was exported with (fastad export --fp16)")
    if path.is_dir():
        if backend == "auto":
            backend = "triton" if device != "cpu" and torch.cuda.is_available() else "torch"
        if backend not in RUN_BACKENDS:
            fmt = {"onnx": "onnx", "openvino": "openvino"}.get(backend, "engine")
            raise FastADError(f"backend {backend} needs an exported file, not a run directory: "
                              f"fastad export --run {path} --format {fmt} --out ...")
        return TorchEngine(path, backend, device, precision, threads)
    if path.suffix == ".onnx":
        if backend not in ("auto", "onnx"):
            raise FastADError(f"{path} is an ONNX model: use backend onnx (or auto)")
        return OnnxEngine(path, device, threads)
    if path.suffix == ".xml":
        if backend not in ("auto", "openvino"):
            raise FastADError(f"{path} is an OpenVINO IR: use backend openvino (or auto)")
        return OpenVINOEngine(path, device, precision, threads)
    if path.suffix in ENGINE_SUFFIXES:
        if backend not in ("auto", "tensorrt"):
            raise FastADError(f"{path} is a TensorRT engine: use backend tensorrt (or auto)")
        return TensorRTEngine(path, device)
    raise FastADError(f"{path}: expected a run directory, an .onnx file, an OpenVINO .xml or a TensorRT "
                      f"{'/'.join(ENGINE_SUFFIXES)} file")


# --------------------------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------------------------
class Predictor:
    """Load once, predict many times (`fastad.load` returns one). `path`: run directory, .onnx or
    TensorRT .engine.

    backend: auto (see the module docstring) or one of fastad.backends.BACKENDS: torch,
    torch-lean, triton (run directory), onnx, tensorrt (exported files).
    threshold / pixel_threshold: override the defaults (sidecar or run config, see
    `postprocess.default_thresholds`); `calibrate()` sets both from normal images.
    batch_size: the engine sees at most this many images per call.
    precision: fp32 (default), fp16 or bf16 for a run directory (see `TorchEngine`); fp32 or bf16
    for an OpenVINO IR.
    threads: CPU threads the engine may use (default: its own choice; torch's is process-wide).
    """

    def __init__(self, path, backend: str = "auto", device: str = "auto", *,
                 threshold: float | None = None, pixel_threshold: float | None = None,
                 batch_size: int = 8, min_region_area: int = 1, warmup: bool = True,
                 precision: str = "fp32", threads: int | None = None):
        if int(batch_size) < 1:
            raise FastADError(f"batch_size must be >= 1, got {batch_size}")
        self.engine = open_engine(path, backend, device, precision, threads)
        meta = self.engine.meta
        self.resize, self.crop = int(meta["resize"]), int(meta["crop"])
        defaults = meta.get("thresholds") or {}
        image_thr = _check_threshold(threshold, "threshold") if threshold is not None else defaults.get("image")
        pix = pixel_threshold if pixel_threshold is not None else (threshold if threshold is not None else defaults.get("pixel"))
        self._thresholds = (image_thr, _check_threshold(pix, "pixel_threshold") if pix is not None else None)
        limit = self.engine.max_batch
        self.batch_size = min(int(batch_size), limit) if limit else int(batch_size)
        self.min_region_area = int(min_region_area)
        self._lock = threading.Lock()
        if warmup:
            self.engine.run(np.zeros((1, 3, self.crop, self.crop), np.float32))

    # The thresholds live in one tuple, replaced at once, so readers never see half an update.
    @property
    def image_threshold(self) -> float | None:
        return self._thresholds[0]

    @image_threshold.setter
    def image_threshold(self, value) -> None:
        self._thresholds = (value, self._thresholds[1])

    @property
    def pixel_threshold(self) -> float | None:
        return self._thresholds[1]

    @pixel_threshold.setter
    def pixel_threshold(self, value) -> None:
        self._thresholds = (self._thresholds[0], value)

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def image_size(self) -> int:
        return self.crop

    @property
    def model(self):
        """The torch model of a run directory (e.g. for its family's `explain`); None for an
        exported .onnx / .engine."""
        return self.engine.model

    @property
    def family(self) -> str | None:
        """The model family's registry name, from the run config or the sidecar."""
        return self.engine.meta.get("model")

    def scores_and_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The engine on a ready float32 (B, 3, S, S) batch, chunked by batch_size; a chunk that
        runs out of memory is split (see the module docstring)."""
        maps, scores = [], []
        start = 0
        while start < batch.shape[0]:
            with self._lock:
                chunk = np.ascontiguousarray(batch[start:start + self.batch_size])
                try:
                    m, s = self.engine.run(chunk)
                except Exception as e:  # noqa: BLE001 - each engine has its own OOM exception
                    if not is_out_of_memory(e):
                        raise
                    self._shrink_after_oom(len(chunk), e)
                    continue
            maps.append(m)
            scores.append(s)
            start += len(chunk)
        return np.concatenate(maps), np.concatenate(scores)

    def _shrink_after_oom(self, size: int, err: BaseException) -> None:
        """Halve the engine batch after `size` images ran out of memory (called under the lock)."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if size <= 1:
            raise FastADError(f"out of memory running one {self.crop}x{self.crop} image on {self.engine.device} "
                              f"({self.backend}): the model does not fit there; free memory, use a lower "
                              "precision or another device") from None
        self.batch_size = min(self.batch_size, max(1, size // 2))
        log.warning("out of memory with a batch of %d on %s: splitting it, engine batch size is now %d "
                    "(%s)", size, self.engine.device, self.batch_size, str(err).splitlines()[0][:120])

    def predict(self, images) -> Result:
        """Images (paths, PIL, uint8 H×W[×C] arrays of any size, float (3, H, W) / (B, 3, H, W)
        in [0, 1] of any size, or a list of these) -> `Result`."""
        batch, sizes = prepare_batch(images, self.resize, self.crop)
        maps, scores = self.scores_and_maps(batch.numpy())
        thr, pixel_thr = self._thresholds  # one consistent pair, even while another thread calibrates
        flagged = scores > thr if thr is not None else np.zeros(len(scores), bool)
        masks, regions = [], []
        for amap, size in zip(maps, sizes):
            mask, found = postprocess.postprocess_image(amap, size, self.resize, self.crop, pixel_thr,
                                                        min_area=self.min_region_area)
            masks.append(mask)
            regions.append(found)
        return Result(scores, flagged, maps, masks, regions, thr, pixel_thr)

    def calibrate(self, normal_images, quantile: float = 1.0, margin: float = 0.0) -> dict:
        """Set the image and pixel thresholds from held-out normal images: the `quantile` of
        their image scores (1.0 = their maximum: no false alarm on them) × (1 + margin)."""
        if not 0.0 < quantile <= 1.0 or margin < 0 or not math.isfinite(margin):
            raise FastADError(f"calibrate: need 0 < quantile <= 1 and margin >= 0, got {quantile}, {margin}")
        batch, _ = prepare_batch(normal_images, self.resize, self.crop)
        _, scores = self.scores_and_maps(batch.numpy())
        thr = float(np.quantile(scores, quantile)) * (1.0 + margin)
        self._thresholds = (thr, thr)
        return {"image": thr, "pixel": thr, "num_images": int(len(scores)),
                "source": f"calibrated on {len(scores)} normal images: quantile {quantile} x (1 + {margin})"}

    def __repr__(self) -> str:
        return (f"Predictor(backend={self.backend!r}, device={self.engine.device}, size={self.crop}, "
                f"threshold={self.image_threshold})")


def _check_threshold(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FastADError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise FastADError(f"{name} must be finite, got {value!r}")
    return v
