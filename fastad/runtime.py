"""One runtime for every backend: a run directory, an .onnx or a TensorRT .engine, one call.

    from fastad import Predictor
    p = Predictor("runs/bottle")                    # torch (reference ops); backend="triton" on CUDA
    p = Predictor("bottle.onnx")                    # onnxruntime, CPU or CUDA (device="cuda")
    p = Predictor("bottle.engine")                  # TensorRT
    p.calibrate(["good/000.png", ...])              # threshold from normal validation images
    res = p.predict(["a.png", frame_uint8_hwc, ...])  # any sizes, uint8 or float in [0, 1]
    res.scores, res.is_anomalous                    # (B,) image scores and decisions
    res.anomaly_maps                                # (B, S, S) maps at the model's resolution
    res.masks[i], res.regions[i]                    # per image, in that image's own pixel grid

Read top-down: thresholds → engines (torch / onnxruntime / TensorRT, each `run(float32 batch) ->
(maps, scores)`) → preprocessing of any-size inputs → `Predictor`.

Geometry: an input of size H×W is resized to `resize`² and centre-cropped to `crop`² (the
model's input, as in training). Its map is placed back into the crop window of a `resize`²
canvas (zero outside, i.e. "not anomalous") and resized bilinearly to H×W, so masks and region
boxes are in the caller's pixel coordinates.

Thread safety: one Predictor may be shared by several threads. Engine calls are serialised per
instance (a TensorRT execution context and its buffers are single-stream); preprocessing and
post-processing (the C++ module releases the GIL) run concurrently.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from . import postprocess
from .data.images import prepare_images
from .errors import FastADError
from .postprocess import Region

RUN_BACKENDS = ("torch", "torch-lean", "triton")
BACKENDS = RUN_BACKENDS + ("onnx", "tensorrt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


# --------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------
def default_thresholds(conf: dict) -> dict:
    """Thresholds from the scores of the normal training images recorded at training time:
    image = max(max, mean + 4·std) of those scores; pixel = the same value, so an image is
    flagged exactly when its mask is non-empty (its score is the map's maximum). Training scores
    are optimistic (the model has seen these images): `Predictor.calibrate` on held-out normal
    images is the better choice when they exist."""
    ns = conf.get("normal_scores") or {}
    if not all(k in ns for k in ("mean", "std", "max")):
        return {"image": None, "pixel": None, "source": "none (no normal scores recorded)"}
    thr = float(max(ns["max"], ns["mean"] + 4 * ns["std"]))
    return {"image": thr, "pixel": thr,
            "source": f"normal training scores ({ns.get('num_images', '?')} images): max(max, mean + 4 std)"}


# --------------------------------------------------------------------------------------------
# Engines: float32 (B, 3, S, S) numpy in [0, 1] -> (maps (B, S, S), scores (B,)) numpy float32
# --------------------------------------------------------------------------------------------
class TorchEngine:
    """A run directory through PyTorch: reference ops ("torch"), the memory-lean blocked torch
    kernels ("torch-lean") or the fused Triton kernels on CUDA ("triton")."""

    max_batch = None

    def __init__(self, run_dir, backend: str = "torch", device: str = "auto"):
        from .run import load_model

        model, conf = load_model(run_dir, device, backend)
        self.model, self.name = model, backend
        self.device = next(model.parameters()).device
        cfg = model.cfg
        self.meta = {"model": conf.get("model", "fod"), "resize": cfg.resize, "crop": cfg.crop,
                     "thresholds": default_thresholds(conf), "source": str(run_dir)}

    @torch.inference_mode()
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = self.model(torch.from_numpy(batch).to(self.device))
        return amap.float().cpu().numpy(), score.float().cpu().numpy()


def _meta_from_sidecar(path: Path) -> dict:
    from fastad.export.onnx import read_sidecar

    side = read_sidecar(path)
    return {"model": side.get("model"), "resize": side["input"]["resize"], "crop": side["input"]["crop"],
            "thresholds": side.get("thresholds") or {"image": None, "pixel": None}, "source": str(path),
            "precision": side.get("precision"), "sidecar": side}


class OnnxEngine:
    """An exported .onnx through onnxruntime: CPUExecutionProvider, or CUDA with device="cuda"."""

    max_batch = None

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
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers)
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
        try:
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        except OSError as e:
            raise FastADError(f"cannot read {path}: {e}") from None
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


def open_engine(path, backend: str = "auto", device: str = "auto"):
    """Pick the engine for `path`: a run directory (torch backends), .onnx, or .engine/.plan."""
    path = Path(path)
    if backend not in ("auto",) + BACKENDS:
        raise FastADError(f"unknown backend {backend!r}: use auto, {', '.join(BACKENDS)}")
    if not path.exists():
        raise FastADError(f"{path} does not exist")
    if path.is_dir():
        if backend == "auto":
            backend = "triton" if device != "cpu" and torch.cuda.is_available() else "torch"
        if backend not in RUN_BACKENDS:
            raise FastADError(f"backend {backend} needs an exported file, not a run directory: "
                              f"fastad export --run {path} --format {'onnx' if backend == 'onnx' else 'engine'} --out ...")
        return TorchEngine(path, backend, device)
    if path.suffix == ".onnx":
        if backend not in ("auto", "onnx"):
            raise FastADError(f"{path} is an ONNX model: use backend onnx (or auto)")
        return OnnxEngine(path, device)
    if path.suffix in ENGINE_SUFFIXES:
        if backend not in ("auto", "tensorrt"):
            raise FastADError(f"{path} is a TensorRT engine: use backend tensorrt (or auto)")
        return TensorRTEngine(path, device)
    raise FastADError(f"{path}: expected a run directory, an .onnx file or a TensorRT "
                      f"{'/'.join(ENGINE_SUFFIXES)} file")


# --------------------------------------------------------------------------------------------
# Preprocessing of any-size inputs
# --------------------------------------------------------------------------------------------
def _float_any_size(x: torch.Tensor, resize: int, crop: int, what: str) -> torch.Tensor | None:
    """A float (3, H, W) / (B, 3, H, W) image in [0, 1] of a size other than crop² -> resized and
    centre-cropped like the PIL path (bilinear, antialiased). None when it is already crop²."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3 or min(x.shape) == 0:
        raise FastADError(f"{what} has shape {tuple(x.shape)}: float images must be (3, H, W) or "
                          "(B, 3, H, W) RGB in [0, 1]")
    if x.shape[2] == crop and x.shape[3] == crop:
        return None
    x = x.float()
    if not bool(torch.isfinite(x).all()) or float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3:
        raise FastADError(f"{what}: float images must be finite and in [0, 1]")
    x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False, antialias=True)
    top = int(round((resize - crop) / 2.0))
    return x[:, :, top:top + crop, top:top + crop].clamp(0, 1)


def _items(images) -> list:
    if isinstance(images, (list, tuple)):
        if not images:
            raise FastADError("no images given: the list is empty")
        return list(images)
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return list(images)
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return [images[i] for i in range(images.shape[0])]
    return [images]


def _original_size(item) -> tuple[int, int]:
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.size[::-1]
    shape = tuple(item.shape)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return shape[:2]
    return shape[-2:]  # float (3, H, W)


def prepare_any(images, resize: int, crop: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """User images of any size -> (float32 (B, 3, crop, crop), [(H, W) of each original])."""
    from .data.images import load_image

    batch, sizes = [], []
    for i, item in enumerate(_items(images)):
        what = f"image {i}"
        resized = None
        if isinstance(item, (str, os.PathLike)):
            item = load_image(item)  # decoded once: pixels and original size from the same image
        if isinstance(item, np.ndarray) and np.issubdtype(item.dtype, np.floating):
            item = torch.from_numpy(np.ascontiguousarray(item))
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            resized = _float_any_size(item.detach().cpu(), resize, crop, what)
        batch.append(resized if resized is not None else prepare_images([item], resize, crop))
        sizes.append(tuple(int(v) for v in _original_size(item)))
    return torch.cat(batch).numpy(), sizes


def map_to_original(amap: np.ndarray, size: tuple[int, int], resize: int, crop: int) -> np.ndarray:
    """A (crop, crop) map -> (H, W) in the original image's pixel grid (see module docstring)."""
    if resize != crop:
        canvas = np.zeros((resize, resize), np.float32)
        top = int(round((resize - crop) / 2.0))
        canvas[top:top + crop, top:top + crop] = amap
        amap = canvas
    if amap.shape == tuple(size):
        return amap
    return postprocess.upsample_bilinear(amap, size, align_corners=False)


# --------------------------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------------------------
class Result(NamedTuple):
    scores: np.ndarray              # (B,) image anomaly scores
    is_anomalous: np.ndarray        # (B,) bool: score > image threshold (all False without one)
    anomaly_maps: np.ndarray        # (B, S, S) float32 maps at the model's resolution
    masks: list[np.ndarray]         # per image (H_i, W_i) bool: map > pixel threshold
    regions: list[list[Region]]     # per image, connected defect regions, highest peak first
    image_threshold: float | None
    pixel_threshold: float | None


class Predictor:
    """Load once, predict many times. `path`: run directory, .onnx or TensorRT .engine.

    backend: auto | torch | torch-lean | triton (run directory) | onnx | tensorrt.
    threshold / pixel_threshold: override the defaults (sidecar or run config, see
    `default_thresholds`); `calibrate()` sets both from normal images.
    """

    def __init__(self, path, backend: str = "auto", device: str = "auto", *,
                 threshold: float | None = None, pixel_threshold: float | None = None,
                 batch_size: int = 8, min_region_area: int = 1, warmup: bool = True):
        if int(batch_size) < 1:
            raise FastADError(f"batch_size must be >= 1, got {batch_size}")
        self.engine = open_engine(path, backend, device)
        meta = self.engine.meta
        self.resize, self.crop = int(meta["resize"]), int(meta["crop"])
        defaults = meta.get("thresholds") or {}
        self.image_threshold = _check_threshold(threshold, "threshold") if threshold is not None else defaults.get("image")
        pix = pixel_threshold if pixel_threshold is not None else (threshold if threshold is not None else defaults.get("pixel"))
        self.pixel_threshold = _check_threshold(pix, "pixel_threshold") if pix is not None else None
        limit = self.engine.max_batch
        self.batch_size = min(int(batch_size), limit) if limit else int(batch_size)
        self.min_region_area = int(min_region_area)
        self._lock = threading.Lock()
        if warmup:
            self.engine.run(np.zeros((1, 3, self.crop, self.crop), np.float32))

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def image_size(self) -> int:
        return self.crop

    def scores_and_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The engine on a ready float32 (B, 3, S, S) batch, chunked by batch_size."""
        maps, scores = [], []
        for start in range(0, batch.shape[0], self.batch_size):
            with self._lock:
                m, s = self.engine.run(np.ascontiguousarray(batch[start:start + self.batch_size]))
            maps.append(m)
            scores.append(s)
        return np.concatenate(maps), np.concatenate(scores)

    def predict(self, images) -> Result:
        """Images (paths, PIL, uint8 H×W[×C] arrays of any size, float (3, H, W) / (B, 3, H, W)
        in [0, 1] of any size, or a list of these) -> `Result`."""
        batch, sizes = prepare_any(images, self.resize, self.crop)
        maps, scores = self.scores_and_maps(batch)
        thr = self.image_threshold
        flagged = scores > thr if thr is not None else np.zeros(len(scores), bool)
        masks, regions = [], []
        for amap, size in zip(maps, sizes):
            full = map_to_original(amap, size, self.resize, self.crop)
            if self.pixel_threshold is None:
                masks.append(np.zeros(full.shape, bool))
                regions.append([])
                continue
            mask = postprocess.threshold(full, self.pixel_threshold)
            masks.append(mask)
            regions.append(postprocess.regions(mask, full, min_area=self.min_region_area))
        return Result(scores, flagged, maps, masks, regions, thr, self.pixel_threshold)

    def calibrate(self, normal_images, quantile: float = 1.0, margin: float = 0.0) -> dict:
        """Set the image and pixel thresholds from held-out normal images: the `quantile` of
        their image scores (1.0 = their maximum: no false alarm on them) × (1 + margin)."""
        if not 0.0 < quantile <= 1.0 or margin < 0 or not math.isfinite(margin):
            raise FastADError(f"calibrate: need 0 < quantile <= 1 and margin >= 0, got {quantile}, {margin}")
        batch, _ = prepare_any(normal_images, self.resize, self.crop)
        _, scores = self.scores_and_maps(batch)
        thr = float(np.quantile(scores, quantile)) * (1.0 + margin)
        self.image_threshold = self.pixel_threshold = thr
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
