"""Python API: load a trained run directory and predict.

    model = fastad.load("runs/bottle")
    res = model.predict(["a.png", "b.png"])   # paths, PIL images, uint8 H×W×3 arrays,
    res.score          # (B,) numpy float32 image scores          or float (B, 3, S, S) in [0, 1]
    res.anomaly_map    # (B, S, S) numpy float32, the final (blurred) map
"""
from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np
import torch

from .data.images import prepare_images
from .run import load_model
from .errors import FastADError
from .ops import set_impl


class Prediction(NamedTuple):
    score: np.ndarray        # (B,) image anomaly scores (max of the map)
    anomaly_map: np.ndarray  # (B, S, S) final anomaly maps


class ModelPredictor:
    """A trained model (FOD or ADTR) ready for inference, as `fastad.load` returns it. Thread-safe:
    calls are serialised per instance. (For thresholds, masks, regions and the ONNX/TensorRT
    backends use the runtime, `fastad.Predictor`.)"""

    def __init__(self, model, config: dict):
        self.model = model.eval()
        self.config = config
        self.cfg = model.cfg
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return self.cfg.crop

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 16) -> Prediction:
        """Score images: a path, PIL image, uint8 array, list of these, or a float (B, 3, S, S)
        array/tensor in [0, 1] already resized to S = `image_size`."""
        batch = prepare_images(images, self.cfg.resize, self.cfg.crop)
        scores, maps = [], []
        with self._lock:
            for start in range(0, batch.shape[0], batch_size):
                amap, score = self.model(batch[start:start + batch_size].to(self.device))
                maps.append(amap.float().cpu())
                scores.append(score.float().cpu())
        return Prediction(torch.cat(scores).numpy(), torch.cat(maps).numpy())

    def __repr__(self) -> str:
        bb = self.config["backbone"]
        return (f"{type(self).__name__}(model={self.config.get('model')!r}, backbone={bb['name']!r}, "
                f"size={self.image_size}, device={self.device})")


FODPredictor = ModelPredictor  # the name from before ADTR existed


def load(run_dir: str | os.PathLike, device: str = "auto", backend: str | None = None) -> ModelPredictor:
    """Load a run directory written by `fastad train` (FOD or ADTR) for inference.

    backend: None (the model's reference ops), or "auto" / "triton" / "torch" to score through
    fastad.kernels (FOD: fused Triton I2Correlation on CUDA, memory-lean torch blocks elsewhere;
    ADTR: the fused L2 feature distance)."""
    model, conf = load_model(run_dir, device)
    if backend is not None:  # the kernels' names of before fastad.backends ("torch" was the lean path)
        on_cuda = next(model.parameters()).is_cuda
        impl = {"torch": "lean", "triton": "triton", "auto": "triton" if on_cuda else "lean"}.get(backend)
        if impl is None:
            raise FastADError(f"backend must be None, auto, triton or torch, got {backend!r}")
        set_impl(model, impl)
    return ModelPredictor(model, conf)
