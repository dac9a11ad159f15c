"""INT8 post-training quantisation, shared by the ONNX and OpenVINO exports: which images calibrate
it and which layers are int8.

Calibration images: up to CALIBRATION_IMAGES normal images, preprocessed exactly as at inference
(`fastad.preprocess.prepare_images`), spread over the run's training data or over a folder the user
names (`--calibration DIR`). Up to VALIDATION_IMAGES of the other normal images check the int8
graph against the fp32 one (max |Δ map| / range, rank correlation of the image scores); the
sidecar records the result.

Int8 layers: the linear layers only — every matrix product of an activation by a 2-D constant
weight — except those feeding a Sigmoid within a few elementwise/layout steps: FOD's σ heads,
whose output enters the RBF target through an exponential, so their rounding error is not small.
The σ heads also read their input in float: the input they share with the q/k/v projections gets
a quantise/dequantise pair per int8 consumer (onnxruntime's DedicatedQDQPair), not one shared by
all. Everything else stays floating point: the backbone's convolutions (quantising them moved the
tiny run's map by most of its range), the attention products, the correlation statistics
(softmax, RBF target, KL) and the blur.

    images, held_out = normal_images(run_dir, calibration, resize, crop)
    quantize_onnx_int8(fp32.onnx, int8.onnx, images)   # onnxruntime, QDQ (export/onnx.py)
    openvino_linear_layers(ov_model)                    # names for NNCF (export/openvino.py)
    int8_check(run_fp32, run_int8, held_out)            # the sidecar's quantization.check
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from fastad.errors import FastADError

CALIBRATION_IMAGES = 64
VALIDATION_IMAGES = 32
CALIBRATION_BATCH = 8

# Operations a σ head's product passes through on its way to the Sigmoid (bias, scale, head split),
# in ONNX's and OpenVINO's spelling.
_PASS_THROUGH = {"Add", "Mul", "Multiply", "Reshape", "Transpose"}
_SIGMA_DEPTH = 6


def normal_images(run_dir, calibration: str | os.PathLike | None, resize: int, crop: int,
                  limit: int = CALIBRATION_IMAGES, held_out: int = VALIDATION_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """-> (up to `limit` calibration images, up to `held_out` other normal images for the int8
    check; possibly none), float32 (n, 3, S, S): from `calibration` (a folder of images, or a
    dataset root with a train split), else from the run's recorded training data."""
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
    chosen = paths[::max(1, len(paths) // limit)][:limit]  # spread over the set, not its first files
    rest = [p for p in paths if p not in set(chosen)]
    held = rest[::max(1, len(rest) // held_out)][:held_out]
    empty = np.zeros((0, 3, crop, crop), np.float32)
    return prepare_images(chosen, resize, crop).numpy(), prepare_images(held, resize, crop).numpy() if held else empty


def run_batched(run, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`run(batch) -> (maps, scores)` over `images` in CALIBRATION_BATCH chunks, concatenated."""
    chunks = [run(images[i:i + CALIBRATION_BATCH]) for i in range(0, len(images), CALIBRATION_BATCH)]
    return np.concatenate([m for m, _ in chunks]), np.concatenate([s for _, s in chunks])


def int8_check(run_fp32, run_int8, images: np.ndarray) -> dict:
    """The int8 graph against the fp32 one on held-out normal images; `run_*(batch) -> (maps,
    scores)`. -> max |Δ map| / map range and the rank correlation of the image scores."""
    from scipy.stats import spearmanr

    if len(images) < 2:
        return {"validation_images": int(len(images))}
    (ref_maps, ref_scores), (maps, scores) = run_batched(run_fp32, images), run_batched(run_int8, images)
    return {"validation_images": int(len(images)),
            "max_rel_diff_map": float(np.abs(maps - ref_maps).max() / ((ref_maps.max() - ref_maps.min()) or 1.0)),
            "score_rank_correlation": float(spearmanr(ref_scores, scores).statistic)}


def quantization_record(tool: str, layers: list[str], images: np.ndarray, calibration) -> dict:
    """The sidecar's "quantization" entry: what was quantised, with what, calibrated on what
    (the caller adds "check": `int8_check`'s result)."""
    return {"tool": tool, "int8_layers": len(layers), "calibration_images": int(len(images)),
            "calibration": str(calibration) if calibration else "the run's training data"}


def _reaches_sigmoid(node, consumers, kind, depth: int = _SIGMA_DEPTH) -> bool:
    """True when `node`'s output reaches a Sigmoid through pass-through operations only;
    `consumers(node)` lists the nodes reading its output, `kind(node)` names its operation."""
    if depth == 0:
        return False
    return any(kind(c) == "Sigmoid" or (kind(c) in _PASS_THROUGH and _reaches_sigmoid(c, consumers, kind, depth - 1))
               for c in consumers(node))


# --------------------------------------------------------------------------------------------
# ONNX (onnxruntime.quantization)
# --------------------------------------------------------------------------------------------
def onnx_linear_layers(proto) -> list[str]:
    """Names of the ONNX nodes to run in int8 (see the module docstring)."""
    weights = {t.name: t for t in proto.graph.initializer}
    readers: dict[str, list] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def consumers(node):
        return [c for out in node.output for c in readers.get(out, [])]

    linear = []
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        a, w = node.input[0], node.input[1]
        if (w in weights and len(weights[w].dims) == 2 and a not in weights
                and not _reaches_sigmoid(node, consumers, lambda n: n.op_type)):
            linear.append(node.name)
    return linear


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an array of images."""

    def __init__(self, input_name: str, images: np.ndarray):
        self._feeds = iter([{input_name: images[i:i + CALIBRATION_BATCH]}
                            for i in range(0, len(images), CALIBRATION_BATCH)])

    def get_next(self):
        return next(self._feeds, None)


def quantize_onnx_int8(src: str | os.PathLike, dst: str | os.PathLike, images: np.ndarray,
                       calibration=None) -> dict:
    """fp32 .onnx `src` -> int8 QDQ .onnx `dst`, calibrated (min/max) on `images` (n, 3, S, S).
    -> its sidecar "quantization" entry.

    Weights int8 per output channel with the 7-bit range (reduce_range: no int16 overflow in the
    u8×s8 products of CPUs without VNNI), activations uint8 per tensor."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    proto = onnx.load(str(src))
    linear = onnx_linear_layers(proto)
    if not linear:
        raise FastADError("--int8: the model has no linear layers to quantise")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime's root-logger advice to pre-process: not needed, shapes are static
    try:
        quantize_static(str(src), str(dst), _Batches(proto.graph.input[0].name, images), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=linear,
                        per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"DedicatedQDQPair": True, "MatMulConstBOnly": True})
    finally:
        root.setLevel(level)
    return quantization_record(f"onnxruntime {onnxruntime.__version__} (QDQ)", linear, images, calibration)


def onnx_runner(path: str | os.PathLike):
    """An onnxruntime CPU session on `path` as `batch -> (maps, scores)`, for `int8_check`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: tuple(session.run(["anomaly_map", "score"], {name: batch}))


# --------------------------------------------------------------------------------------------
# OpenVINO (NNCF)
# --------------------------------------------------------------------------------------------
def _ov_producer(port):
    """The node feeding an OpenVINO input port, looking through dtype conversions and transposes."""
    node = port.get_source_output().get_node()
    while node.get_type_name() in ("Convert", "Transpose"):
        node = node.input(0).get_source_output().get_node()
    return node


def openvino_linear_layers(ov_model) -> tuple[list[str], list[str]]:
    """-> (names of the OpenVINO operations to run in int8, see the module docstring; names of
    every other operation NNCF would quantise, for its ignored scope)."""
    def consumers(op):
        return [t.get_node() for t in op.output(0).get_target_inputs()]

    linear, other = [], []
    for op in ov_model.get_ops():
        kind = op.get_type_name()
        if kind == "MatMul":
            a, w = _ov_producer(op.input(0)), _ov_producer(op.input(1))
            is_linear = (w.get_type_name() == "Constant" and len(w.get_output_partial_shape(0)) == 2
                         and a.get_type_name() != "Constant"
                         and not _reaches_sigmoid(op, consumers, lambda n: n.get_type_name()))
            (linear if is_linear else other).append(op.get_friendly_name())
        elif kind in ("Convolution", "GroupConvolution", "ScaledDotProductAttention", "MVN", "Multiply", "Add"):
            other.append(op.get_friendly_name())
    return linear, other


__all__ = ["normal_images", "int8_check", "run_batched", "onnx_runner", "quantization_record", "onnx_linear_layers", "quantize_onnx_int8",
           "openvino_linear_layers", "CALIBRATION_IMAGES"]
