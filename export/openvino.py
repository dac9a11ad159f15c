"""OpenVINO export of a trained run, for CPU production lines: IR (model.xml + model.bin) + sidecar.

    fastad export --run runs/bottle --format openvino --out bottle.xml
    fastad export --run runs/bottle --format openvino --out bottle-int8.xml --int8 [--calibration DIR]

The graph is the ONNX export's (the same inputs, outputs and fp32 statistics, see export/onnx.py),
converted with `openvino.convert_model`; weights stay fp32 in the file. Reduced precision:

- bf16: not a file property. The fp32 IR runs in bf16 on CPUs with AVX512-BF16 / AMX when the
  runtime is asked for it (`fastad.load(xml, precision="bf16")`: OpenVINO's
  INFERENCE_PRECISION_HINT), so one file serves both.
- int8 (`--int8`): NNCF post-training quantisation (`nncf.quantize`, transformer preset) of the
  linear layers only — every matrix product with a 2-D constant weight — calibrated on normal
  training images (the run's training data unless `--calibration DIR` names a folder of normal
  images). Everything else stays in floating point, by `weight_products` below: the backbone's
  convolutions (measured in docs/deployment.md), the
  attention products, the correlation statistics (softmax, RBF target, KL) and the blur.

Every file is written atomically: a failed export leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from fastad.errors import FastADError
from fastad.sidecar import sidecar_path
from fastad.utils import atomic_path

CALIBRATION_IMAGES = 64


def import_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise FastADError("OpenVINO is not installed: pip install openvino (and nncf for --int8)") from None
    return ov


def calibration_images(run_dir, calibration: str | os.PathLike | None, resize: int, crop: int,
                       limit: int = CALIBRATION_IMAGES) -> np.ndarray:
    """Up to `limit` normal images as float32 (n, 3, S, S): from `calibration` (a folder of images,
    or a dataset root with a train split), else from the run's recorded training data."""
    from fastad.data.layouts import _images_in, list_samples
    from fastad.preprocess import prepare_images
    from fastad.run import read_run_config

    if calibration is None:
        training = read_run_config(run_dir).get("training") or {}
        data, layout = training.get("data"), training.get("layout")
        if not data or not Path(data).exists():
            raise FastADError(f"{run_dir}: its training data {data!r} is not available; "
                              "name normal images with --calibration DIR")
        paths = [s.path for s in list_samples(data, "train", layout=layout)]
    else:
        root = Path(calibration)
        if not root.is_dir():
            raise FastADError(f"--calibration {root}: not a directory")
        paths = [str(p) for p in _images_in(root)]
        if not paths:
            paths = [s.path for s in list_samples(root, "train")]
    if not paths:
        raise FastADError("no calibration images found")
    step = max(1, len(paths) // limit)  # spread over the set, not its first files
    return prepare_images(paths[::step][:limit], resize, crop).numpy()


def _producer(port):
    """The node feeding an input port, looking through dtype conversions and transposes."""
    node = port.get_source_output().get_node()
    while node.get_type_name() in ("Convert", "Transpose"):
        node = node.input(0).get_source_output().get_node()
    return node


def _feeds_sigmoid(op, depth: int = 6) -> bool:
    """True for a product whose output reaches a Sigmoid through elementwise and layout
    operations: FOD's σ head, which enters the RBF target through an exponential, so its
    rounding error is not small."""
    if depth == 0:
        return False
    for target in op.output(0).get_target_inputs():
        node = target.get_node()
        kind = node.get_type_name()
        if kind == "Sigmoid" or (kind in ("Add", "Multiply", "Reshape", "Transpose") and _feeds_sigmoid(node, depth - 1)):
            return True
    return False


def weight_products(ov_model) -> tuple[list[str], list[str]]:
    """-> (names of the linear layers' matrix products: activation × 2-D constant weight, σ heads
    excepted; names of every other operation NNCF would quantise)."""
    linear, other = [], []
    for op in ov_model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul":
            a, w = _producer(op.input(0)), _producer(op.input(1))
            is_linear = (w.get_type_name() == "Constant" and len(w.get_output_partial_shape(0)) == 2
                         and a.get_type_name() != "Constant" and not _feeds_sigmoid(op))
            (linear if is_linear else other).append(op.get_friendly_name())
        elif kind in ("Convolution", "GroupConvolution", "ScaledDotProductAttention", "MVN", "Multiply", "Add"):
            other.append(op.get_friendly_name())
    return linear, other


def quantize_int8(ov_model, images: np.ndarray):
    """NNCF post-training INT8 quantisation of the linear layers, calibrated on `images`
    (n, 3, S, S), one per call."""
    try:
        import nncf
    except ImportError:
        raise FastADError("--int8 needs NNCF: pip install nncf") from None
    linear, other = weight_products(ov_model)
    if not linear:
        raise FastADError("--int8: the model has no linear layers to quantise")
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    return nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(images),
                         ignored_scope=nncf.IgnoredScope(names=other, validate=False))


def export_openvino(run_dir: str | os.PathLike, out: str | os.PathLike, *, int8: bool = False,
                    calibration: str | os.PathLike | None = None) -> dict:
    """Run directory -> OpenVINO IR `out` (.xml, + .bin and `out`.json sidecar). -> the sidecar."""
    from .onnx import export_onnx, file_sha256

    from fastad.sidecar import read_sidecar

    out = Path(out)
    if out.suffix != ".xml":
        raise FastADError(f"--out must end in .xml (OpenVINO IR; the weights go to .bin beside it), got {out}")
    if out.exists() and out.is_dir():
        raise FastADError(f"{out} is a directory")
    ov = import_openvino()
    with tempfile.TemporaryDirectory(prefix="fastad-ov-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(run_dir, onnx_path, check=False)
        side = read_sidecar(onnx_path)
        model = ov.convert_model(str(onnx_path))
        extra = {}
        if int8:
            images = calibration_images(run_dir, calibration, side["input"]["resize"], side["input"]["crop"])
            model = quantize_int8(model, images)
            extra = {"calibration_images": len(images), "calibration": str(calibration) if calibration else "training data"}
        ir = Path(tmp) / "model.xml"
        ov.save_model(model, str(ir), compress_to_fp16=False)
        side.update({
            "file": out.name, "artifact": "openvino", "precision": "int8" if int8 else "fp32",
            "openvino": {"version": ov.get_version(), "weights": out.with_suffix(".bin").name,
                         "weights_sha256": file_sha256(ir.with_suffix(".bin")), **extra},
            "sha256": file_sha256(ir),
        })
        # .bin first: a reader that finds the .xml finds its weights
        with atomic_path(out.with_suffix(".bin")) as tmp_bin:
            tmp_bin.write_bytes(ir.with_suffix(".bin").read_bytes())
        with atomic_path(out) as tmp_xml, atomic_path(sidecar_path(out)) as tmp_json:
            tmp_xml.write_bytes(ir.read_bytes())
            tmp_json.write_text(json.dumps(side, indent=2) + "\n")
    return side


__all__ = ["export_openvino", "calibration_images"]
