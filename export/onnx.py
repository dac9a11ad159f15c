"""ONNX export of a trained run: the whole inference graph in one model.

    fastad export --run runs/bottle --format onnx --out bottle.onnx [--fp16 | --int8 [--calibration DIR]]

Graph: input ``images`` float32 (B, 3, S, S) RGB in [0, 1] (resized by the caller; the backbone's
mean/std normalisation is inside) -> outputs ``anomaly_map`` float32 (B, S, S), the final blurred
map, and ``score`` float32 (B,). The batch axis is dynamic; everything else is static, and the
reference features, standardisation and position grids are constants in the file.

The I2Correlation scoring is the reference impl's blocked path (`fastad.kernels.i2corr`'s lean
path with 256-row blocks, see `fastad.ops`): plain MatMul / Softmax / Log / ReduceSum, one
softmax per block of 256 query rows, so no
intermediate tensor holds B·H·N² elements (TensorRT's 2³¹-element limit is reached only above
batch 256 at 256² input; `check_onnx` computes the largest volume for a given batch).

fp16 variant: the weights and activations are fp16 but the input and outputs stay float32 (casts
inside the graph), and the correlation statistics (softmax, RBF target, KL) stay fp32 as in the
torch path — the log-probabilities of a 1024-way softmax lose too much in fp16. This is the file
that a strongly typed TensorRT (11.x) build needs for fp16.

int8 variant (onnxruntime on a CPU line): the fp32 graph with the linear layers' inputs and weights
behind QuantizeLinear/DequantizeLinear pairs (QDQ), calibrated on normal images; which layers and
which images: export/quantize.py.

Every file is written atomically: a failed export leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

from fastad.errors import FastADError
from fastad.postprocess import default_thresholds
from fastad.sidecar import SIDECAR_FORMAT, sidecar_path
from fastad.utils import atomic_path, library_versions

INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
DEFAULT_OPSET = 17


class InferenceGraph(nn.Module):
    """What gets traced: float32 images -> (float32 anomaly_map, float32 score) in any dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, images: torch.Tensor):
        amap, score = self.model(images.to(self.dtype))
        return amap.float(), score.float()


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_sidecar(conf: dict, model, *, precision: str, opset: int, fmt: str, file: Path,
                  extra: dict | None = None) -> dict:
    """Everything a runtime needs besides the graph: sizes, preprocessing, thresholds, provenance."""
    cfg = model.cfg
    bb = conf["backbone"]
    return {
        "format": SIDECAR_FORMAT,
        "file": file.name,
        "sha256": file_sha256(file),
        "artifact": fmt,
        "precision": precision,
        "model": conf["model"],
        "input": {
            "name": INPUT_NAME, "dtype": "float32", "shape": ["batch", 3, cfg.crop, cfg.crop],
            "layout": "NCHW", "color": "RGB", "range": [0.0, 1.0],
            "resize": cfg.resize, "crop": cfg.crop, "resample": "bilinear",
        },
        "normalization": {"mean": list(bb["mean"]), "std": list(bb["std"]), "inside_graph": True},
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": ["batch", cfg.crop, cfg.crop]},
            "score": {"dtype": "float32", "shape": ["batch"]},
        },
        "thresholds": default_thresholds(conf),
        "normal_scores": conf.get("normal_scores"),
        "model_config": conf["config"],
        "backbone": {k: bb[k] for k in ("name", "strides", "weights_source", "fingerprint") if k in bb},
        "opset": opset,
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def export_onnx(run_dir: str | os.PathLike, out: str | os.PathLike, *, fp16: bool = False,
                int8: bool = False, calibration: str | os.PathLike | None = None,
                opset: int = DEFAULT_OPSET, check: bool = True, check_batch: int = 32) -> dict:
    """Export the run in `run_dir` to `out` (.onnx) plus its sidecar JSON. -> the sidecar dict.
    `int8`: the linear layers in int8 (QDQ), calibrated on normal images (export/quantize.py).

    Raises FastADError for a bad run, output path or opset; with `check`, also when the graph
    uses anything outside TensorRT's supported set (see `fastad.export.check`).
    """
    import onnx

    from fastad.run import load_model

    from .check import check_onnx
    from .quantize import int8_check, normal_images, onnx_runner, quantize_onnx_int8

    out = Path(out)
    if out.suffix != ".onnx":
        raise FastADError(f"--out must end in .onnx, got {out}")
    if out.exists() and out.is_dir():
        raise FastADError(f"{out} is a directory")
    if not 17 <= opset <= 20:
        raise FastADError(f"opset {opset} not supported: use 17..20 (TensorRT 10 parses up to 20)")
    if fp16 and int8:
        raise FastADError("--fp16 and --int8 exclude each other: pick one")
    model, conf = load_model(run_dir, device="cpu")
    dtype = torch.float16 if fp16 else torch.float32
    graph = InferenceGraph(model, dtype).eval()
    crop = model.cfg.crop
    example = torch.rand(2, 3, crop, crop)
    dynamic = {INPUT_NAME: {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}}
    sidecar_file = sidecar_path(out)
    # The sidecar is renamed into place last (the outer block ends last): a killed export leaves
    # no sidecar pointing at a missing or older model.
    with atomic_path(sidecar_file) as tmp_json, atomic_path(out) as tmp_onnx:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # tracer/deprecation chatter; the graph is checked below
            torch.onnx.export(graph, (example,), str(tmp_onnx), input_names=[INPUT_NAME],
                              output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic,
                              opset_version=opset, do_constant_folding=True, dynamo=False)
        extra = {}
        if int8:
            images, held_out = normal_images(run_dir, calibration, model.cfg.resize, crop)
            with tempfile.TemporaryDirectory(prefix="fastad-int8-") as tmp:
                fp32 = Path(tmp) / "fp32.onnx"
                os.replace(tmp_onnx, fp32)
                extra["quantization"] = quantize_onnx_int8(fp32, tmp_onnx, images, calibration)
                extra["quantization"]["check"] = int8_check(onnx_runner(fp32), onnx_runner(tmp_onnx), held_out)
        proto = onnx.load(str(tmp_onnx))
        onnx.checker.check_model(proto, full_check=True)
        report = check_onnx(proto, batch=check_batch) if check else None
        if report is not None and not report.ok:
            raise FastADError(f"exported graph is not TensorRT-compatible: {report.errors[0]}")
        sidecar = build_sidecar(
            conf, model, precision="int8" if int8 else "fp16" if fp16 else "fp32", opset=opset, fmt="onnx",
            file=tmp_onnx, extra={"trt_check": report.summary() if report is not None else None, **extra})
        sidecar["file"] = out.name
        tmp_json.write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


__all__ = ["export_onnx", "build_sidecar", "InferenceGraph",
           "INPUT_NAME", "OUTPUT_NAMES"]
