"""Python API: load a trained run directory and predict.

    model = fastad.load("runs/bottle")
    res = model.predict(["a.png", "b.png"])   # paths, PIL images, uint8 H×W×3 arrays,
    res.score          # (B,) numpy float32 image scores          or float (B, 3, S, S) in [0, 1]
    res.anomaly_map    # (B, S, S) numpy float32, the final (blurred) map
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbones import FeatureExtractor
from .data.images import prepare_images
from .errors import FastADError
from .models.adtr import ADTR, ADTRConfig
from .models.fod import FOD, FODConfig
from .ops import set_impl
from .train import CONFIG_FILE, WEIGHTS_FILE, resolve_device

# "model" key of a run's config.json -> (config class, model class)
FAMILIES = {"fod": (FODConfig, FOD), "adtr": (ADTRConfig, ADTR)}


class Prediction(NamedTuple):
    score: np.ndarray        # (B,) image anomaly scores (max of the map)
    anomaly_map: np.ndarray  # (B, S, S) final anomaly maps


def read_run_config(run_dir: str | os.PathLike) -> dict:
    run = Path(run_dir)
    if not run.is_dir():
        raise FastADError(f"run directory {run} does not exist")
    path = run / CONFIG_FILE
    if not path.is_file():
        raise FastADError(f"{run} is not a trained fastad run (no {CONFIG_FILE}; did training finish?)")
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FastADError(f"cannot read {path}: {e}") from None
    if not isinstance(conf, dict) or "config" not in conf or "backbone" not in conf:
        raise FastADError(f"{path} is not a fastad run config (missing 'config' or 'backbone')")
    return conf


def read_weights(run: Path) -> dict:
    """model.safetensors of a run directory (never unpickled), or one FastADError line."""
    try:
        return load_file(str(run / WEIGHTS_FILE))
    except FileNotFoundError:
        raise FastADError(f"{run} has no {WEIGHTS_FILE}") from None
    except (OSError, SafetensorError) as e:
        raise FastADError(f"cannot read {run / WEIGHTS_FILE}: {e}") from None


def load_state_checked(model, state: dict, run: Path, hint: str):
    """Strict `load_state_dict`; a mismatch is one FastADError line naming the first problem."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise FastADError(f"{run / WEIGHTS_FILE} does not match {CONFIG_FILE} ({hint}): {first}") from None
    return model


def load_model(run_dir: str | os.PathLike, device: str = "auto") -> tuple[FOD | ADTR, dict]:
    """Rebuild the model of a run directory (any family in FAMILIES), checking weights against
    config. -> (model, config)."""
    run = Path(run_dir)
    conf = read_run_config(run)
    if conf.get("model") == "utad":
        from .train_utad import load_utad

        return load_utad(run, conf, device), conf
    if conf.get("model") not in FAMILIES:
        raise FastADError(f"{run}: unsupported model {conf.get('model')!r} (known: {', '.join([*FAMILIES, 'utad'])})")
    config_cls, model_cls = FAMILIES[conf["model"]]
    try:
        cfg = config_cls.from_dict(conf["config"])
    except (TypeError, ValueError) as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    state = read_weights(run)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = FeatureExtractor.restore(conf["backbone"], backbone_state)
    try:
        model = model_cls(cfg, backbone)
    except ValueError as e:
        raise FastADError(f"{run / CONFIG_FILE}: invalid model config: {e}") from None
    model = load_state_checked(model, state, run, "other backbone or config?")
    return model.to(resolve_device(device)).eval(), conf


class ModelPredictor:
    """A trained model (FOD or ADTR) ready for inference, as `fastad.load` returns it. Thread-safe:
    calls are serialised per instance. (For thresholds, masks, regions and the ONNX/TensorRT
    backends use the runtime, `fastad.Predictor`.)"""

    def __init__(self, model: FOD | ADTR, config: dict):
        self.model = model.eval()
        self.config = config
        self.cfg: FODConfig | ADTRConfig = model.cfg
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
